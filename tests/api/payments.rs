//! Paid calls end to end on a real anvil chain: happy path, replays, every rejection.

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use base64::Engine;
use serde_json::{Value, json};
use tollgate::client::sign::{SignParams, sign_payment};
use tollgate::clock::Clock;
use tollgate::payment::wire::PaymentRequirements;

use crate::helpers::{COUNTED_PRICE, TestApp, spawn_app};

fn price() -> U256 {
    U256::from(COUNTED_PRICE)
}

/// Balances of the payer and payTo, to assert exactly what moved.
async fn balances(app: &TestApp, payer: &PrivateKeySigner) -> (U256, U256) {
    (app.balance(payer.address()).await, app.balance(app.chain.pay_to).await)
}

#[tokio::test]
async fn a_paid_call_moves_exactly_the_price_and_runs_the_handler_once() {
    // Arrange
    let app = spawn_app().await;
    let payer = app.payer();
    let (payer_before, payee_before) = balances(&app, &payer).await;
    let requirements = app.requirements("counted", json!({ "text": "hi" })).await;
    let payload = app.sign(&payer, &requirements);
    // Act
    let result = app.pay("counted", json!({ "text": "hi" }), &payload).await;
    // Assert
    assert_eq!(result["isError"], false, "{result}");
    assert_eq!(result["structuredContent"], json!({ "run": 1, "echo": "hi" }));
    let response = &result["_meta"]["x402/payment-response"];
    assert_eq!(response["success"], true);
    assert_eq!(response["network"], requirements.network);
    assert_eq!(response["payer"], payer.address().to_checksum(None));
    let tx = response["transaction"].as_str().expect("tx hash");
    let receipt = app.anvil_rpc("eth_getTransactionReceipt", json!([tx])).await;
    assert_eq!(receipt["result"]["status"], "0x1", "the settlement tx is on chain");
    let (payer_after, payee_after) = balances(&app, &payer).await;
    assert_eq!(payer_before - payer_after, price(), "payer pays exactly the price");
    assert_eq!(payee_after - payee_before, price(), "payTo receives exactly the price");
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn every_payment_form_is_accepted_object_base64_and_header() {
    let app = spawn_app().await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({})).await;
    let encode = |v: &Value| base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(v).unwrap());
    // base64 string in _meta
    let payload = app.sign(&payer, &requirements);
    let result = app.pay("counted", json!({}), &Value::String(encode(&payload))).await;
    assert_eq!(result["isError"], false, "base64 _meta: {result}");
    // PAYMENT-SIGNATURE header
    let payload = app.sign(&payer, &requirements);
    let mut mcp = app.sessionless();
    mcp.http = reqwest::Client::builder()
        .default_headers(
            [(
                reqwest::header::HeaderName::from_static("payment-signature"),
                encode(&payload).parse().unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let result = mcp.call_tool("counted", json!({}), None).await;
    assert_eq!(result["isError"], false, "header: {result}");
    assert_eq!(app.runs(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn replaying_a_completed_payment_returns_the_stored_result_without_a_second_charge() {
    // Arrange: one completed payment.
    let app = spawn_app().await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({})).await;
    let payload = app.sign(&payer, &requirements);
    let first = app.pay("counted", json!({ "text": "a" }), &payload).await;
    let (payer_mid, _) = balances(&app, &payer).await;
    // Act: the same payload again (a client retry after a lost response).
    let replay = app.pay("counted", json!({ "text": "a" }), &payload).await;
    // Assert
    assert_eq!(replay, first, "the stored result, byte for byte, with the same payment response");
    assert_eq!(app.runs(), 1, "the handler did not run again");
    assert_eq!(balances(&app, &payer).await.0, payer_mid, "no second charge");
    app.shutdown().await;
}

#[tokio::test]
async fn a_different_payload_reusing_a_claimed_nonce_is_refused() {
    let app = spawn_app().await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({})).await;
    let now = app.clock.now_unix();
    let params = SignParams::standard(now, 300);
    let payload = sign_payment(&payer, &requirements, None, &params).unwrap();
    app.pay("counted", json!({}), &payload).await;
    // Same nonce, different validBefore: a different signed payload.
    let other = SignParams { valid_before: params.valid_before - 1, ..params };
    let reuse = sign_payment(&payer, &requirements, None, &other).unwrap();
    let result = app.pay("counted", json!({}), &reuse).await;
    assert_eq!(result["structuredContent"]["error"], "invalid_exact_evm_nonce_already_used", "{result}");
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn the_payment_identifier_makes_retries_idempotent_and_conflicts_are_refused() {
    let app = spawn_app().await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({})).await;
    let with_id = |mut p: Value, id: &str| {
        p["extensions"] = json!({ "payment-identifier": { "info": { "id": id } } });
        p
    };
    let payload = with_id(app.sign(&payer, &requirements), "pay_0123456789abcdef");
    let first = app.pay("counted", json!({}), &payload).await;
    assert_eq!(app.pay("counted", json!({}), &payload).await, first);
    // A new authorization under the same identifier: a conflict, not a second charge.
    let other = with_id(app.sign(&payer, &requirements), "pay_0123456789abcdef");
    let conflict = app.pay("counted", json!({}), &other).await;
    assert_eq!(conflict["structuredContent"]["error"], "payment_identifier_conflict", "{conflict}");
    assert!(conflict["structuredContent"].get("accepts").is_none(), "not a price");
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

/// Makes a bad payload from the app, the payer and the honest requirements.
type MakeBad = Box<dyn Fn(&TestApp, &PrivateKeySigner, &PaymentRequirements) -> Value>;

/// A bad payment: what it is, how it is made from a good one, the reason code expected.
struct Bad {
    why: &'static str,
    code: &'static str,
    make: MakeBad,
}

fn resigned(
    app: &TestApp,
    signer: &PrivateKeySigner,
    requirements: &PaymentRequirements,
    edit: impl Fn(&mut PaymentRequirements, &mut SignParams),
) -> Value {
    // Sign edited requirements, then put the honest `accepted` back: only the signed
    // authorization differs, as a buggy or hostile client would send it.
    let mut edited = requirements.clone();
    let mut params = SignParams::standard(app.clock.now_unix(), 300);
    edit(&mut edited, &mut params);
    let mut payload = sign_payment(signer, &edited, None, &params).unwrap();
    payload["accepted"] = serde_json::to_value(requirements).unwrap();
    payload
}

fn bad_payments() -> Vec<Bad> {
    vec![
        Bad {
            why: "signed by another key",
            code: "invalid_exact_evm_signature",
            make: Box::new(|app, payer, r| {
                let mut p = app.sign(&PrivateKeySigner::random(), r);
                p["payload"]["authorization"]["from"] = json!(payer.address().to_checksum(None));
                p
            }),
        },
        Bad {
            why: "recipient is not payTo",
            code: "invalid_exact_evm_recipient_mismatch",
            make: Box::new(|app, payer, r| {
                resigned(app, payer, r, |e, _| {
                    e.pay_to = PrivateKeySigner::random().address().to_checksum(None)
                })
            }),
        },
        Bad {
            why: "expires within the safety margin",
            code: "invalid_exact_evm_payload_authorization_valid_before",
            make: Box::new(|app, payer, r| {
                resigned(app, payer, r, |_, p| p.valid_before = app.clock.now_unix() + 3)
            }),
        },
        Bad {
            why: "not valid yet",
            code: "invalid_exact_evm_payload_authorization_valid_after",
            make: Box::new(|app, payer, r| {
                resigned(app, payer, r, |_, p| p.valid_after = app.clock.now_unix() + 60)
            }),
        },
        Bad {
            why: "value below the price",
            code: "invalid_exact_evm_authorization_value",
            make: Box::new(|app, payer, r| {
                resigned(app, payer, r, |e, _| e.amount = (COUNTED_PRICE - 1).to_string())
            }),
        },
        Bad {
            why: "value above the price",
            code: "invalid_exact_evm_authorization_value",
            make: Box::new(|app, payer, r| {
                resigned(app, payer, r, |e, _| e.amount = (COUNTED_PRICE + 1).to_string())
            }),
        },
        Bad {
            why: "wrong chain",
            code: "invalid_exact_evm_network_mismatch",
            make: Box::new(|app, payer, r| {
                let mut e = r.clone();
                e.network = "eip155:8453".into();
                app.sign(payer, &e)
            }),
        },
        Bad {
            why: "wrong asset",
            code: "invalid_payment_requirements",
            make: Box::new(|app, payer, r| {
                let mut e = r.clone();
                e.asset = tollgate::chain::BASE_USDC.to_checksum(None);
                app.sign(payer, &e)
            }),
        },
        Bad {
            why: "wrong EIP-712 domain name",
            code: "invalid_payment_requirements",
            make: Box::new(|app, payer, r| {
                let mut e = r.clone();
                e.extra.name = "USDC".into();
                app.sign(payer, &e)
            }),
        },
        Bad {
            why: "x402 version 1",
            code: "invalid_x402_version",
            make: Box::new(|app, payer, r| {
                let mut p = app.sign(payer, r);
                p["x402Version"] = json!(1);
                p
            }),
        },
        Bad { why: "not base64", code: "invalid_payload", make: Box::new(|_, _, _| json!("!!not base64!!")) },
        Bad {
            why: "missing authorization",
            code: "invalid_payload",
            make: Box::new(|app, payer, r| {
                let mut p = app.sign(payer, r);
                p["payload"].as_object_mut().unwrap().remove("authorization");
                p
            }),
        },
        Bad {
            why: "truncated signature",
            code: "invalid_exact_evm_signature",
            make: Box::new(|app, payer, r| {
                let mut p = app.sign(payer, r);
                let sig = p["payload"]["signature"].as_str().unwrap()[..100].to_owned();
                p["payload"]["signature"] = json!(sig);
                p
            }),
        },
    ]
}

#[tokio::test]
async fn every_rejection_names_its_reason_charges_nothing_and_never_runs_the_handler() {
    // Arrange
    let app = spawn_app().await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({})).await;
    let before = balances(&app, &payer).await;
    for bad in bad_payments() {
        // Act
        let payload = (bad.make)(&app, &payer, &requirements);
        let result = app.pay("counted", json!({}), &payload).await;
        // Assert: PaymentRequired again, with the reason code and a readable message.
        let body = &result["structuredContent"];
        assert_eq!(result["isError"], true, "{}", bad.why);
        assert_eq!(body["error"], bad.code, "{}: {body}", bad.why);
        assert_eq!(body["x402Version"], 2, "{}: a re-challenge", bad.why);
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", bad.why);
        assert_eq!(body["accepts"][0], serde_json::to_value(&requirements).unwrap(), "{}", bad.why);
    }
    assert_eq!(app.runs(), 0, "no rejected payment reached the handler");
    assert_eq!(balances(&app, &payer).await, before, "nothing moved");
    app.shutdown().await;
}

#[tokio::test]
async fn insufficient_balance_is_refused_and_the_authorization_stays_usable() {
    // Arrange: a wallet with no USDC.
    let app = spawn_app().await;
    let poor = PrivateKeySigner::random();
    let requirements = app.requirements("counted", json!({})).await;
    let payload = app.sign(&poor, &requirements);
    // Act
    let refused = app.pay("counted", json!({}), &payload).await;
    // Assert
    assert_eq!(refused["structuredContent"]["error"], "invalid_exact_evm_insufficient_balance", "{refused}");
    assert_eq!(app.runs(), 0);
    // Once funded, the very same authorization pays: the refusal did not burn its claim.
    let minter = tollgate::chain::parse_private_key(tollgate::chain::anvil::DEV_KEYS[0]).unwrap();
    let provider = alloy::providers::ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(minter))
        .connect_http(app.chain.anvil.endpoint().parse().unwrap());
    tollgate::chain::usdc::mint(&provider, app.chain.token, poor.address(), price()).await.unwrap();
    let paid = app.pay("counted", json!({}), &payload).await;
    assert_eq!(paid["isError"], false, "{paid}");
    assert_eq!(app.balance(poor.address()).await, U256::ZERO);
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}
