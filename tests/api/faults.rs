//! Faults on the chain side, injected on loopback: no lost payment, no double charge.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use alloy::primitives::U256;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate::payment::reconcile::Reconciler;
use tollgate::store::PaymentState;

use crate::helpers::{COUNTED_PRICE, Relay, spawn_app_with};

#[tokio::test]
async fn an_unreachable_rpc_before_settlement_charges_nothing_and_the_authorization_stays_usable() {
    // Arrange: tollgate reaches the chain only through a relay we can cut.
    let relay = Arc::new(std::sync::OnceLock::<Relay>::new());
    let slot = relay.clone();
    let app = spawn_app_with(move |c| {
        let port: u16 = c.network.rpc_url_port();
        let relay = futures_block_on_relay(port);
        c.network.rpc_url = format!("http://127.0.0.1:{}", relay.port).into();
        let _ = slot.set(relay);
    })
    .await;
    let relay = relay.get().unwrap();
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    // Act: the RPC goes away.
    relay.up.store(false, Ordering::SeqCst);
    let refused = app.pay("counted", json!({}), &payload).await;
    // Assert: a clear error, not a price; nothing charged; nothing ran.
    assert_eq!(refused["structuredContent"]["error"], "chain_unavailable", "{refused}");
    assert_eq!(refused["structuredContent"]["charged"], false);
    assert!(refused["structuredContent"].get("accepts").is_none());
    assert_eq!(app.balance(payer.address()).await, before);
    assert_eq!(app.runs(), 0);
    // The RPC returns: the same authorization pays, once.
    relay.up.store(true, Ordering::SeqCst);
    let paid = app.pay("counted", json!({}), &payload).await;
    assert_eq!(paid["isError"], false, "{paid}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    app.shutdown().await;
}

/// Starts a relay synchronously from inside the config closure (which is not async).
fn futures_block_on_relay(port: u16) -> Relay {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let relay = rt.block_on(Relay::start(port));
        // Keep the relay's runtime alive for the rest of the test process.
        std::mem::forget(rt);
        relay
    })
    .join()
    .unwrap()
}

trait RpcPort {
    fn rpc_url_port(&self) -> u16;
}

impl RpcPort for tollgate::config::NetworkConfig {
    fn rpc_url_port(&self) -> u16 {
        let url = tollgate::config::secret_opt(&self.rpc_url).unwrap();
        url.rsplit(':').next().unwrap().parse().unwrap()
    }
}

/// A JSON-RPC proxy that forwards everything to anvil but, while armed, loses the answer to
/// `eth_sendRawTransaction` *after* anvil accepted the transaction.
#[derive(Clone, Default)]
struct LossyRpc {
    anvil: String,
    armed: Arc<AtomicBool>,
    /// While set, the next `eth_sendRawTransaction` never reaches anvil: the node "refuses" it.
    swallow: Arc<AtomicBool>,
}

async fn lossy(State(rpc): State<LossyRpc>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if is_broadcast(&request) && rpc.swallow.swap(false, Ordering::SeqCst) {
        let refused = json!({ "jsonrpc": "2.0", "id": request["id"],
            "error": { "code": -32000, "message": "txpool is full" } });
        return axum::Json(refused).into_response();
    }
    let answer = reqwest::Client::new()
        .post(&rpc.anvil)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    if is_broadcast(&request) && rpc.armed.swap(false, Ordering::SeqCst) {
        return (axum::http::StatusCode::BAD_GATEWAY, "connection lost").into_response();
    }
    ([("content-type", "application/json")], answer).into_response()
}

/// tollgate whose RPC goes through `rpc` (a proxy to the test's own anvil).
async fn spawn_behind(rpc: LossyRpc) -> crate::helpers::TestApp {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    spawn_app_with(move |c| {
        let anvil = tollgate::config::secret_opt(&c.network.rpc_url).unwrap().to_owned();
        let router = axum::Router::new().fallback(lossy).with_state(LossyRpc { anvil, ..rpc });
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, router).await.unwrap();
            });
        });
        c.network.rpc_url = format!("http://127.0.0.1:{proxy_port}").into();
    })
    .await
}

#[tokio::test]
async fn a_broadcast_the_node_refused_stays_pending_until_chain_time_passes_its_expiry() {
    // Arrange: the node refuses our first broadcast (an explicit error is still ambiguous: in a
    // load-balanced pool, another node may have taken it, and its payload may be public).
    let rpc = LossyRpc::default();
    let swallow = rpc.swallow.clone();
    let app = spawn_behind(rpc).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let first = app.sign(&payer, &app.requirements("counted", json!({})).await);
    swallow.store(true, Ordering::SeqCst);
    let pending = app.pay("counted", json!({}), &first).await;
    assert_eq!(pending["structuredContent"]["error"], "payment_confirmation_pending", "{pending}");
    // Act: the next settlement takes the same relayer nonce and is mined; the payer retries.
    let second = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let paid = app.pay("counted", json!({}), &second).await;
    assert_eq!(paid["isError"], false, "{paid}");
    let retry = app.pay("counted", json!({}), &first).await;
    // Assert: while anyone could still land it, it stays pending and claims nothing…
    assert_eq!(retry["structuredContent"]["error"], "payment_confirmation_pending", "{retry}");
    assert!(retry["structuredContent"].get("charged").is_none(), "{retry}");
    // … and once a block's time is past its validBefore, it fails, uncharged.
    app.advance_time(400).await;
    let report = Reconciler::new(app.state.gate.clone(), Duration::ZERO).tick().await.unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    let after = app.pay("counted", json!({}), &first).await;
    assert_eq!(
        after["structuredContent"]["error"], "invalid_exact_evm_payload_authorization_valid_before",
        "{after}"
    );
    assert_eq!(
        before - app.balance(payer.address()).await,
        U256::from(COUNTED_PRICE),
        "only the second paid"
    );
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn an_rpc_that_drops_the_answer_after_the_transaction_was_sent_leaves_a_pending_payment_that_resolves()
{
    // Arrange
    let rpc = LossyRpc::default();
    let armed = rpc.armed.clone();
    let app = spawn_behind(rpc).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    // Act: the transaction reaches the node's mempool, its acknowledgement does not.
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    armed.store(true, Ordering::SeqCst);
    let first = app.pay("counted", json!({}), &payload).await;
    // Assert: pending (money may move), never a new price; then resolved from the chain.
    assert_eq!(first["structuredContent"]["error"], "payment_confirmation_pending", "{first}");
    assert_eq!(app.runs(), 0);
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    Reconciler::new(app.state.gate.clone(), Duration::ZERO).tick().await.unwrap();
    assert!(app.state.store.unresolved(10).await.unwrap().is_empty(), "resolved from chain state");
    let paid = app.pay("counted", json!({}), &payload).await;
    assert_eq!(paid["isError"], false, "{paid}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE), "charged once");
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_reorg_that_drops_the_settlement_is_detected_and_nothing_is_served_before_confirmations() {
    // Arrange: two confirmations required; blocks mined only on request.
    let app = spawn_app_with(|c| {
        c.payment.confirmations = 2;
        c.payment.settle_timeout_secs = 2;
    })
    .await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let snapshot = app.anvil_rpc("evm_snapshot", json!([])).await["result"].clone();
    // Act: the settlement is mined (1 confirmation), then a reorg removes its block.
    let pending = {
        let call = app.pay("counted", json!({}), &payload);
        let reorg = async {
            let settling = loop {
                let rows = app.state.store.unresolved(10).await.unwrap();
                if let Some(row) = rows.into_iter().find(|r| r.tx_hash.is_some()) {
                    break row;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let reverted = app.anvil_rpc("evm_revert", json!([snapshot])).await;
            assert_eq!(reverted["result"], true, "{reverted}");
            settling
        };
        let (result, settling) = tokio::join!(call, reorg);
        assert_eq!(settling.state, PaymentState::Settling);
        result
    };
    // Assert: not served, no receipt, nothing charged after the reorg.
    assert_eq!(pending["structuredContent"]["error"], "payment_confirmation_pending", "{pending}");
    assert_eq!(app.runs(), 0, "the handler never ran on one confirmation");
    assert_eq!(app.state.store.receipt_count().await.unwrap(), 0, "no receipt before confirmations");
    assert_eq!(app.balance(payer.address()).await, before, "the reorg undid the transfer");
    // Expiry: the reconciler fails it; nothing was charged.
    app.advance_time(400).await;
    let report = Reconciler::new(app.state.gate.clone(), Duration::ZERO).tick().await.unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    assert_eq!(app.balance(payer.address()).await, before);
    app.shutdown().await;
}

#[tokio::test]
async fn a_relayer_out_of_gas_is_unready_and_refuses_payments_without_charging() {
    // Arrange: a relayer key with no ETH at all.
    let broke = alloy::signers::local::PrivateKeySigner::random();
    let key = format!("0x{}", hex::encode(broke.to_bytes()));
    let app = spawn_app_with(move |c| c.payment.relayer_key = key.into()).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    // Act
    let ready = reqwest::get(format!("{}/readyz", app.base_url())).await.unwrap();
    let refused = app.pay("counted", json!({}), &payload).await;
    // Assert: the load balancer is told, and a paid call that slips through costs nothing.
    assert_eq!(ready.status(), 503);
    assert_eq!(refused["structuredContent"]["error"], "chain_unavailable", "{refused}");
    assert_eq!(refused["structuredContent"]["charged"], false);
    assert_eq!(app.balance(payer.address()).await, before);
    assert_eq!(app.runs(), 0);
    assert!(app.state.store.unresolved(10).await.unwrap().is_empty(), "the claim was released");
    app.shutdown().await;
}

#[tokio::test]
async fn an_rpc_failure_while_resolving_a_pending_payment_never_says_nothing_was_charged() {
    // Arrange: a pending payment (its block not mined yet), the chain reached through a relay.
    let relay = Arc::new(std::sync::OnceLock::<Relay>::new());
    let slot = relay.clone();
    let app = spawn_app_with(move |c| {
        c.payment.settle_timeout_secs = 1;
        let relay = futures_block_on_relay(c.network.rpc_url_port());
        c.network.rpc_url = format!("http://127.0.0.1:{}", relay.port).into();
        let _ = slot.set(relay);
    })
    .await;
    let relay = relay.get().unwrap();
    let payer = app.payer();
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let pending = app.pay("counted", json!({}), &payload).await;
    assert_eq!(pending["structuredContent"]["error"], "payment_confirmation_pending", "{pending}");
    // Act: the RPC goes away, and the payer retries.
    relay.up.store(false, Ordering::SeqCst);
    let retry = app.pay("counted", json!({}), &payload).await;
    // Assert: still pending (a transaction exists), never "unavailable, nothing charged".
    let body = &retry["structuredContent"];
    assert_eq!(body["error"], "payment_confirmation_pending", "{retry}");
    assert!(body.get("charged").is_none() && body.get("accepts").is_none(), "{retry}");
    relay.up.store(true, Ordering::SeqCst);
    app.anvil_rpc("evm_mine", json!([])).await;
    let paid = app.pay("counted", json!({}), &payload).await;
    assert_eq!(paid["isError"], false, "{paid}");
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

/// Either way of broadcasting: plain, or EIP-7966's synchronous send.
fn is_broadcast(request: &Value) -> bool {
    request["method"].as_str().is_some_and(|m| m.starts_with("eth_sendRawTransaction"))
}

#[tokio::test]
async fn with_several_rpcs_a_payment_settles_through_the_next_when_the_first_is_down_or_rate_limited() {
    // Arrange: two first endpoints that fail differently, each before anvil in the list.
    let limited = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hits = limited.clone();
    let rate_limiter = axum::Router::new().fallback(move || {
        hits.fetch_add(1, Ordering::SeqCst);
        async { (axum::http::StatusCode::TOO_MANY_REQUESTS, "rate limited") }
    });
    let rate_limited = crate::helpers::serve_on_loopback(rate_limiter).await;
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    for first in [down, rate_limited] {
        let app = spawn_app_with(|c| {
            let node = tollgate::config::secret_opt(&c.network.rpc_url).unwrap().to_owned();
            c.network.rpc_url = first.clone().into();
            c.network.rpc_urls = vec![node.into()];
        })
        .await;
        let payer = app.payer();
        let before = app.balance(payer.address()).await;
        // Act
        let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
        let paid = app.pay("counted", json!({}), &payload).await;
        // Assert: settled and served through the second endpoint, charged once.
        assert_eq!(paid["isError"], false, "first endpoint {first}: {paid}");
        assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
        assert_eq!(app.runs(), 1);
        app.shutdown().await;
    }
    assert!(limited.load(Ordering::SeqCst) > 0, "the rate-limited endpoint was asked first");
}
