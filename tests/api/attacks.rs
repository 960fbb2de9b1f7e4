//! Money safety against hostile payers, third parties and ambiguous settlements: each test plays
//! one attack on a real anvil chain and checks what the payer paid and what anyone got.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolStruct};
use axum::body::Bytes as Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate::chain::anvil::DEV_KEYS;
use tollgate::chain::usdc::TestUsdc;
use tollgate::client::sign::{SignParams, sign_payment};
use tollgate::clock::Clock;
use tollgate::payment::wire::PaymentRequirements;

use crate::helpers::{COUNTED_PRICE, TestApp, spawn_app, spawn_app_with};

alloy::sol!(
    #[sol(rpc)]
    Multicall3,
    "contracts-abi/Multicall3.abi.json"
);

alloy::sol! {
    /// EIP-3009 `CancelAuthorization`, as FiatToken hashes it.
    struct CancelAuthorization {
        address authorizer;
        bytes32 nonce;
    }
}

/// The attacker's wallet (anvil dev account #4): pays gas, never USDC.
pub(crate) fn attacker(app: &TestApp) -> DynProvider {
    let key = tollgate::chain::parse_private_key(DEV_KEYS[4]).unwrap();
    ProviderBuilder::new()
        .wallet(EthereumWallet::from(key))
        .connect_http(app.chain.anvil.endpoint().parse().unwrap())
        .erased()
}

/// `transferWithAuthorization(…, bytes signature)` calldata for a signed payload.
pub(crate) fn authorization_call(payload: &Value) -> Bytes {
    let a = &payload["payload"]["authorization"];
    let num = |k: &str| U256::from_str_radix(a[k].as_str().unwrap(), 10).unwrap();
    let signature: Bytes = payload["payload"]["signature"].as_str().unwrap().parse().unwrap();
    TestUsdc::transferWithAuthorization_0Call {
        from: a["from"].as_str().unwrap().parse().unwrap(),
        to: a["to"].as_str().unwrap().parse().unwrap(),
        value: num("value"),
        validAfter: num("validAfter"),
        validBefore: num("validBefore"),
        nonce: a["nonce"].as_str().unwrap().parse().unwrap(),
        signature,
    }
    .abi_encode()
    .into()
}

/// Sends a transaction from the attacker with a tip far above tollgate's, without waiting: with
/// automine off, anvil orders the next block by fee, so this one lands first.
async fn send_ahead(app: &TestApp, to: Address, input: Bytes) -> B256 {
    let tx = TransactionRequest::default()
        .with_to(to)
        .with_input(input)
        .with_gas_limit(1_000_000)
        .with_max_priority_fee_per_gas(100_000_000_000)
        .with_max_fee_per_gas(200_000_000_000);
    *attacker(app).send_transaction(tx).await.unwrap().tx_hash()
}

/// Deploys the Multicall3 helper (automine must be on).
async fn deploy_multicall(app: &TestApp) -> Address {
    let code = hex::decode(include_str!("../../contracts-abi/Multicall3.bin").trim()).unwrap();
    let tx = TransactionRequest::default().with_deploy_code(Bytes::from(code));
    let receipt = attacker(app).send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
    receipt.contract_address.unwrap()
}

/// The payer's signature over `requirements`, but with this nonce, recipient and value.
fn sign_with(
    app: &TestApp,
    payer: &PrivateKeySigner,
    r: &PaymentRequirements,
    nonce: B256,
    to: Address,
    value: u64,
) -> Value {
    let mut r = r.clone();
    r.pay_to = to.to_checksum(None);
    r.amount = value.to_string();
    let mut params = SignParams::standard(app.clock.now_unix(), r.max_timeout_seconds);
    params.nonce = nonce;
    sign_payment(payer, &r, None, &params).unwrap()
}

/// The helper transaction of the "one transfer, several calls" attack: `aggregate3` calldata
/// that pays the price once (a fresh authorization A1) and burns the nonces of `pending` on
/// zero-value transfers from the payer to itself.
fn one_price_beside_burnt_nonces(
    app: &TestApp,
    payer: &PrivateKeySigner,
    requirements: &PaymentRequirements,
    pending: [&Value; 2],
) -> Bytes {
    let mut spends = vec![app.sign(payer, requirements)];
    spends.extend(pending.map(|p| sign_with(app, payer, requirements, nonce_of(p), payer.address(), 0)));
    let calls = spends
        .iter()
        .map(|p| Multicall3::Call3 {
            target: app.chain.token,
            allowFailure: false,
            callData: authorization_call(p),
        })
        .collect();
    Multicall3::aggregate3Call { calls }.abi_encode().into()
}

fn nonce_of(payload: &Value) -> B256 {
    payload["payload"]["authorization"]["nonce"].as_str().unwrap().parse().unwrap()
}

/// Waits (bounded) until `n` unresolved payments have their settlement transaction recorded.
pub(crate) async fn until_submitted(app: &TestApp, n: usize) {
    let submitted = async {
        loop {
            let rows = app.state.store.unresolved(10).await.unwrap();
            if rows.iter().filter(|r| r.tx_hash.is_some()).count() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), submitted).await.expect("tollgate submitted");
}

/// Pays `counted` with `payload` from a task of its own, for a test that acts on the chain
/// while the call waits for its settlement.
pub(crate) fn pay_later(app: &TestApp, args: Value, payload: &Value) -> tokio::task::JoinHandle<Value> {
    let (url, meta) = (app.mcp_url(), json!({ "x402/payment": payload }));
    tokio::spawn(async move {
        crate::helpers::Mcp::sessionless(&url).call_tool("counted", args, Some(meta)).await
    })
}

/// The call ran once, has one receipt, and the payer paid the price once.
async fn assert_served_and_charged_once(app: &TestApp, payer: Address, before: U256) {
    assert_eq!(app.runs(), 1, "the handler ran once");
    assert_eq!(receipts(app).await, 1, "one receipt");
    assert_eq!(before - app.balance(payer).await, U256::from(COUNTED_PRICE), "charged once");
}

async fn receipts(app: &TestApp) -> i64 {
    app.state.store.receipt_count().await.unwrap()
}

#[tokio::test]
async fn one_transfer_settles_exactly_one_payment_even_beside_other_spent_nonces() {
    // Arrange: tollgate's settlements of A2 and A3 wait in the mempool.
    let app = spawn_app().await;
    let payer = app.payer();
    let pay_to: Address = app.state.config.payment.pay_to.unwrap();
    let multicall = deploy_multicall(&app).await;
    let requirements = app.requirements("counted", json!({})).await;
    let (a2, a3) = (app.sign(&payer, &requirements), app.sign(&payer, &requirements));
    let before = app.balance(payer.address()).await;
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let first = pay_later(&app, json!({}), &a2);
    until_submitted(&app, 1).await;
    let calls = [first, pay_later(&app, json!({}), &a3)];
    until_submitted(&app, 2).await;
    // Act: one helper transaction, mined first, pays the price once (A1) and burns N2 and N3 on
    // zero-value transfers from the payer to itself (B2, B3).
    let input = one_price_beside_burnt_nonces(&app, &payer, &requirements, [&a2, &a3]);
    send_ahead(&app, multicall, input).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    // Assert: neither call is served; the payer paid one price (A1), for which nobody asked.
    for call in calls {
        let result = call.await.unwrap();
        assert_eq!(
            result["structuredContent"]["error"], "invalid_exact_evm_authorization_spent_elsewhere",
            "{result}"
        );
        assert!(result.get("_meta").and_then(|m| m.get("x402/payment-response")).is_none(), "{result}");
    }
    assert_eq!(app.runs(), 0, "no handler ran");
    assert_eq!(receipts(&app).await, 0);
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    assert_eq!(app.balance(pay_to).await, U256::from(COUNTED_PRICE));
    // A retry of either payment still buys nothing.
    let retry = app.pay("counted", json!({}), &a2).await;
    assert_eq!(
        retry["structuredContent"]["error"], "invalid_exact_evm_authorization_spent_elsewhere",
        "{retry}"
    );
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn an_authorization_a_third_party_submitted_first_is_honoured_once() {
    // Arrange: someone submits the payer's authorization on chain before tollgate sees it.
    let app = spawn_app().await;
    let payer = app.payer();
    let payload = app.sign(&payer, &app.requirements("counted", json!({"text": "mine"})).await);
    let before = app.balance(payer.address()).await;
    let tx = crate::helpers::submit_on_chain(&app.chain.anvil.endpoint(), app.chain.token, &payload).await;
    // Act
    let result = app.pay("counted", json!({"text": "mine"}), &payload).await;
    // Assert: the money reached payTo, so the call runs once, with a receipt naming that transfer.
    assert_eq!(result["isError"], false, "{result}");
    assert_eq!(result["structuredContent"]["echo"], "mine");
    assert_eq!(result["_meta"]["x402/payment-response"]["transaction"], tx.as_str());
    assert!(result["_meta"]["tollgate/receipt"].is_object(), "{result}");
    let again = app.pay("counted", json!({"text": "mine"}), &payload).await;
    assert_eq!(again, result, "a retry gets the stored result");
    assert_served_and_charged_once(&app, payer.address(), before).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_copy_mined_ahead_of_our_own_settlement_still_pays_for_the_call() {
    // Arrange: tollgate's transaction waits in the mempool.
    let app = spawn_app().await;
    let payer = app.payer();
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let before = app.balance(payer.address()).await;
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let call = pay_later(&app, json!({}), &payload);
    until_submitted(&app, 1).await;
    // Act: a front-runner copies the authorization with a higher tip; ours reverts.
    let copy = send_ahead(&app, app.chain.token, authorization_call(&payload)).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    // Assert: paid once (by the copy), served once, with a receipt naming the copy.
    let result = call.await.unwrap();
    assert_eq!(result["isError"], false, "{result}");
    assert_eq!(result["_meta"]["x402/payment-response"]["transaction"], format!("{copy:#x}"));
    assert_served_and_charged_once(&app, payer.address(), before).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_authorization_fails_clearly_and_runs_nothing() {
    // Arrange: the payer cancels the authorization on chain (EIP-3009 cancelAuthorization).
    let app = spawn_app().await;
    let payer = app.payer();
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let nonce = nonce_of(&payload);
    let domain = app.state.network.domain();
    let cancel = CancelAuthorization { authorizer: payer.address(), nonce };
    let signature = payer.sign_hash_sync(&cancel.eip712_signing_hash(&domain)).unwrap();
    let token = TestUsdc::new(app.chain.token, attacker(&app));
    let call = token.cancelAuthorization(payer.address(), nonce, signature.as_bytes().to_vec().into());
    assert!(call.send().await.unwrap().get_receipt().await.unwrap().status());
    let before = app.balance(payer.address()).await;
    // Act
    let result = app.pay("counted", json!({}), &payload).await;
    // Assert
    assert_eq!(result["structuredContent"]["error"], "invalid_exact_evm_authorization_canceled", "{result}");
    assert_eq!(app.runs(), 0);
    assert_eq!(receipts(&app).await, 0);
    assert_eq!(app.balance(payer.address()).await, before);
    app.shutdown().await;
}

/// Rebuilds a settled payment's payload from public data only: the challenge and the
/// settlement transaction's calldata, as any observer of the chain can.
async fn rebuild_from_calldata(app: &TestApp, requirements: &PaymentRequirements, tx: &str) -> Value {
    let found = app.anvil_rpc("eth_getTransactionByHash", json!([tx])).await;
    let input: Bytes = found["result"]["input"].as_str().unwrap().parse().unwrap();
    let call = tollgate::chain::usdc::Usdc::transferWithAuthorization_1Call::abi_decode(&input).unwrap();
    let mut signature = Vec::with_capacity(65);
    signature.extend_from_slice(call.r.as_slice());
    signature.extend_from_slice(call.s.as_slice());
    signature.push(call.v);
    json!({
        "x402Version": 2,
        "accepted": requirements,
        "payload": {
            "signature": format!("0x{}", hex::encode(signature)),
            "authorization": {
                "from": call.from.to_checksum(None),
                "to": call.to.to_checksum(None),
                "value": call.value.to_string(),
                "validAfter": call.validAfter.to_string(),
                "validBefore": call.validBefore.to_string(),
                "nonce": format!("{:#x}", call.nonce),
            }
        }
    })
}

#[tokio::test]
async fn a_payload_rebuilt_from_calldata_buys_nothing_for_other_arguments() {
    // Arrange: the victim pays for one call.
    let app = spawn_app_with(|c| {
        // One paid request per payer per window: replays must not spend it.
        c.limits.rules = vec![crate::helpers::wallet_limit(1, 3600)];
    })
    .await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({"text": "victim"})).await;
    let payload = app.sign(&payer, &requirements);
    let paid = app.pay("counted", json!({"text": "victim"}), &payload).await;
    assert_eq!(paid["isError"], false, "{paid}");
    let tx = paid["_meta"]["x402/payment-response"]["transaction"].as_str().unwrap().to_owned();
    let before = app.balance(payer.address()).await;
    // Act: a stranger rebuilds the payload and asks for other arguments, then another tool.
    let stolen = rebuild_from_calldata(&app, &requirements, &tx).await;
    let other_args = app.pay("counted", json!({"text": "thief"}), &stolen).await;
    // Assert: refused, clearly, revealing nothing of the first result; no handler ran.
    let body = &other_args["structuredContent"];
    assert_eq!(body["error"], "payment_already_used", "{other_args}");
    assert_eq!(body["charged"], false);
    assert!(!other_args.to_string().contains("victim"), "nothing of the first result leaks: {other_args}");
    assert_eq!(app.runs(), 1);
    // The same call gets the stored answer (the rebuilt payload is the very same payment) …
    let same = app.pay("counted", json!({"text": "victim"}), &stolen).await;
    assert_eq!(same["structuredContent"]["echo"], "victim", "{same}");
    // … and the victim's own retries still get their result, never limited by the replays.
    for _ in 0..3 {
        let retry = app.pay("counted", json!({"text": "victim"}), &payload).await;
        assert_eq!(retry["structuredContent"]["echo"], "victim", "{retry}");
    }
    assert_eq!(app.runs(), 1);
    assert_eq!(app.balance(payer.address()).await, before, "no second charge");
    app.shutdown().await;
}

/// A JSON-RPC proxy in front of anvil that refuses `eth_getLogs` over more than 1,000 blocks,
/// as hosted providers do, and counts what it saw.
#[derive(Clone)]
struct HostedRpc {
    anvil: String,
    widest: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

async fn hosted(State(rpc): State<HostedRpc>, body: Body) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if request["method"] == "eth_getLogs" {
        let block = |k: &str| {
            let v = &request["params"][0][k];
            v.as_str().and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        };
        let span = match (block("fromBlock"), block("toBlock")) {
            (Some(from), Some(to)) => to.saturating_sub(from) + 1,
            _ => u64::MAX,
        };
        rpc.widest.fetch_max(span.min(usize::MAX as u64) as usize, Ordering::SeqCst);
        if span > 1000 {
            rpc.refused.fetch_add(1, Ordering::SeqCst);
            let error = json!({ "jsonrpc": "2.0", "id": request["id"],
                "error": { "code": -32005, "message": "query exceeds max block range 1000" } });
            return axum::Json(error).into_response();
        }
    }
    let answer = reqwest::Client::new()
        .post(&rpc.anvil)
        .body(body)
        .header("content-type", "application/json")
        .send()
        .await;
    match answer {
        Ok(answer) => (axum::http::StatusCode::OK, answer.bytes().await.unwrap_or_default()).into_response(),
        Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[tokio::test]
async fn the_spending_transaction_is_found_through_an_rpc_that_refuses_wide_log_ranges() {
    // Arrange: a third party spends the authorization, then 5,000 blocks are mined on top.
    let mut app = spawn_app().await;
    let rpc = HostedRpc {
        anvil: app.chain.anvil.endpoint(),
        widest: Default::default(),
        refused: Default::default(),
    };
    let router = axum::Router::new().route("/", axum::routing::post(hosted)).with_state(rpc.clone());
    let proxy = crate::helpers::serve_on_loopback(router).await;
    let mut config = app.state.config.clone();
    config.network.rpc_url = proxy.into();
    app.replace_server(config).await;
    let payer = app.payer();
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let tx = crate::helpers::submit_on_chain(&app.chain.anvil.endpoint(), app.chain.token, &payload).await;
    app.anvil_rpc("anvil_mine", json!(["0x1388"])).await;
    // Act
    let result = app.pay("counted", json!({}), &payload).await;
    // Assert: found in bounded windows, never by a refused wide query.
    assert_eq!(result["isError"], false, "{result}");
    assert_eq!(result["_meta"]["x402/payment-response"]["transaction"], tx.as_str());
    assert_eq!(rpc.refused.load(Ordering::SeqCst), 0, "no log query over 1,000 blocks");
    assert!(rpc.widest.load(Ordering::SeqCst) <= 1000);
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

/// A facilitator that accepts every payment at /verify and answers 500 at /settle without
/// settling anything: the payments stay pending, with no transaction of their own.
async fn silent_facilitator() -> String {
    let verify = axum::routing::post(|axum::Json(body): axum::Json<Value>| async move {
        axum::Json(
            json!({ "isValid": true, "payer": body["paymentPayload"]["payload"]["authorization"]["from"] }),
        )
    });
    let settle = axum::routing::post(|| async { axum::http::StatusCode::INTERNAL_SERVER_ERROR });
    let supported = axum::routing::get(|| async {
        axum::Json(json!({ "kinds": [{ "x402Version": 2, "scheme": "exact", "network": "eip155:31337" }] }))
    });
    let router =
        axum::Router::new().route("/verify", verify).route("/settle", settle).route("/supported", supported);
    crate::helpers::serve_on_loopback(router).await
}

#[tokio::test]
async fn a_pending_payment_is_not_settled_by_a_transfer_paired_with_another_authorization() {
    // Arrange: A2 and A3 are pending (the facilitator answered 500, nothing is on chain).
    let mut app = spawn_app_with(|c| c.payment.settle_timeout_secs = 2).await;
    let mut config = app.state.config.clone();
    config.payment.settler = tollgate::config::SettlerKind::Facilitator;
    config.payment.facilitator.url = silent_facilitator().await;
    app.replace_server(config).await;
    let payer = app.payer();
    let multicall = deploy_multicall(&app).await;
    let requirements = app.requirements("counted", json!({})).await;
    let (a2, a3) = (app.sign(&payer, &requirements), app.sign(&payer, &requirements));
    for payload in [&a2, &a3] {
        let pending = app.pay("counted", json!({}), payload).await;
        assert_eq!(pending["structuredContent"]["error"], "payment_confirmation_pending", "{pending}");
    }
    // Act: one helper transaction pays the price once (A1) beside zero-value spends of N2, N3.
    let input = one_price_beside_burnt_nonces(&app, &payer, &requirements, [&a2, &a3]);
    let tx = TransactionRequest::default().with_to(multicall).with_input(input).with_gas_limit(1_000_000);
    assert!(attacker(&app).send_transaction(tx).await.unwrap().get_receipt().await.unwrap().status());
    // Assert: the retries find the helper transaction and serve neither call.
    for payload in [&a2, &a3] {
        let retry = app.pay("counted", json!({}), payload).await;
        assert_eq!(
            retry["structuredContent"]["error"], "invalid_exact_evm_authorization_spent_elsewhere",
            "{retry}"
        );
    }
    assert_eq!(app.runs(), 0, "one transfer must not pay for two calls");
    assert_eq!(receipts(&app).await, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn our_reverted_settlement_keeps_the_payment_bound_to_its_call() {
    // Arrange: tollgate's settlement waits in the mempool; the payer's balance is then drained
    // (ahead of it) by another authorization, so ours reverts with its calldata on chain.
    let app = spawn_app().await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({"text": "mine"})).await;
    let payload = app.sign(&payer, &requirements);
    let balance: u64 = app.balance(payer.address()).await.to();
    let elsewhere = Address::repeat_byte(0x42);
    let drain =
        sign_with(&app, &payer, &requirements, B256::from(rand::random::<[u8; 32]>()), elsewhere, balance);
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let call = pay_later(&app, json!({"text": "mine"}), &payload);
    until_submitted(&app, 1).await;
    send_ahead(&app, app.chain.token, authorization_call(&drain)).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    // Act
    let answer = call.await.unwrap();
    let stolen = app.pay("counted", json!({"text": "thief"}), &payload).await;
    // Assert: not "nothing charged" (the authorization is still valid and public), and the
    // payment stays bound to the call it was signed for: a stranger's arguments get nothing.
    assert_eq!(answer["structuredContent"]["error"], "payment_confirmation_pending", "{answer}");
    assert!(answer["structuredContent"].get("charged").is_none(), "{answer}");
    assert_eq!(stolen["structuredContent"]["error"], "payment_already_used", "{stolen}");
    assert_eq!(app.runs(), 0);
    // Refunded and landed by anyone later, it pays for the payer's own call, once.
    let minter = tollgate::chain::parse_private_key(DEV_KEYS[0]).unwrap();
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(minter))
        .connect_http(app.chain.anvil.endpoint().parse().unwrap());
    tollgate::chain::usdc::mint(&provider, app.chain.token, payer.address(), U256::from(COUNTED_PRICE))
        .await
        .unwrap();
    crate::helpers::submit_on_chain(&app.chain.anvil.endpoint(), app.chain.token, &payload).await;
    let served = app.pay("counted", json!({"text": "mine"}), &payload).await;
    assert_eq!(served["structuredContent"]["echo"], "mine", "{served}");
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn an_authorization_valid_for_longer_than_offered_is_refused() {
    // Arrange: validBefore a day away, where the offer allows maxTimeoutSeconds (300 s).
    let app = spawn_app().await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({})).await;
    let mut params = SignParams::standard(app.clock.now_unix(), 86_400);
    params.nonce = B256::from(rand::random::<[u8; 32]>());
    let payload = sign_payment(&payer, &requirements, None, &params).unwrap();
    // Act
    let refused = app.pay("counted", json!({}), &payload).await;
    // Assert
    assert_eq!(
        refused["structuredContent"]["error"], "invalid_exact_evm_payload_authorization_valid_before",
        "{refused}"
    );
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}
