//! Paying only for calls that work (#16, items 3 and 4): `charge = "before_run" | "on_success"`
//! and `refund_on_error`, on real upstreams (the official MCP Python SDK), a real anvil chain and
//! store, balances checked.

use std::path::Path;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use serde_json::{Value, json};
use tollgate::chain::anvil::DEV_KEYS;
use tollgate::client::sign::{SignParams, sign_payment};
use tollgate::clock::Clock;
use tollgate::config::{ChargePolicy, Config, PriceRule, PriceSetting};

use crate::helpers::{TestApp, spawn_app_with, submit_on_chain};
use crate::upstream::{PRICE, python, script, upstream};

fn rule(charge: ChargePolicy, refund_on_error: bool) -> PriceSetting {
    PriceSetting::Rule(PriceRule {
        price: PRICE.to_string(),
        min_price: None,
        max_price: None,
        charge: Some(charge),
        refund_on_error,
    })
}

/// Two upstreams of the same Python server: `ok_*` tools are `on_success` (the upstream's
/// policy), `pre_*` tools `before_run`, with `pre_broken` refunded on error from the payee's
/// wallet (anvil account #2, which the payments fill).
async fn app_with_policies(calls: &Path) -> TestApp {
    let command = vec![python().await.display().to_string(), script(), "stdio".into(), "0".into()];
    let mut on_success = upstream("py-on-success");
    on_success.prefix = "ok_".into();
    on_success.charge = Some(ChargePolicy::OnSuccess);
    on_success.command = [command.clone(), vec![calls.display().to_string()]].concat();
    let mut before_run = upstream("py-before-run");
    before_run.prefix = "pre_".into();
    before_run.prices.insert("broken".into(), rule(ChargePolicy::BeforeRun, true));
    before_run.command = [command, vec![calls.display().to_string()]].concat();
    spawn_app_with(move |c: &mut Config| {
        c.upstream = vec![on_success, before_run];
        c.tools.refund_key = DEV_KEYS[2].to_owned().into();
    })
    .await
}

async fn receipt_count(app: &TestApp) -> i64 {
    app.state.store.receipt_count().await.unwrap()
}

async fn authorization_used(app: &TestApp, payload: &Value) -> bool {
    let a = &payload["payload"]["authorization"];
    let from: Address = a["from"].as_str().unwrap().parse().unwrap();
    app.chain().authorization_used(from, a["nonce"].as_str().unwrap().parse().unwrap()).await.unwrap()
}

#[tokio::test]
async fn a_failing_tool_is_charged_under_before_run_and_not_under_on_success_whose_authorization_stays_usable()
 {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_policies(&dir.path().join("calls")).await;
    let (payer, pay_to) = (app.payer(), app.chain.pay_to);
    let args = json!({ "text": "x" });
    let before = app.balance(payer.address()).await;
    // Act 1: on_success, the tool fails.
    let payload = app.sign(&payer, &app.requirements("ok_broken", args.clone()).await);
    let failed = app.pay("ok_broken", args.clone(), &payload).await;
    // Assert 1: the tool's error, marked uncharged; nothing moved; the authorization is unused.
    assert_eq!(failed["isError"], true, "{failed}");
    assert_eq!(failed["_meta"]["tollgate/charged"], false, "{failed}");
    assert!(failed["content"][0]["text"].as_str().unwrap().contains("failed on purpose"), "{failed}");
    assert!(failed.to_string().contains("Not charged"), "the agent reading the text is told");
    assert!(failed["_meta"].get("x402/payment-response").is_none(), "nothing settled");
    assert_eq!(app.balance(payer.address()).await, before);
    assert!(!authorization_used(&app, &payload).await, "the authorization stays usable");
    assert_eq!(receipt_count(&app).await, 0);
    // Act 2: the same authorization now buys a call that works (the same price).
    let worked = app.pay("ok_reverse", json!({ "text": "abc" }), &payload).await;
    // Assert 2: charged once, the result served with its settlement and an on_success receipt.
    assert!(worked["content"][0]["text"].as_str().unwrap().contains("cba"), "{worked}");
    assert_eq!(worked["_meta"]["x402/payment-response"]["success"], true);
    assert_eq!(worked["_meta"]["tollgate/receipt"]["body"]["charge"], "on_success");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(PRICE));
    // Act 3: before_run without a refund (pre_reverse is fine; the default for pre_ tools).
    let before_pay_to = app.balance(pay_to).await;
    let charged = app
        .pay("pre_broken", args.clone(), &app.sign(&payer, &app.requirements("pre_broken", args).await))
        .await;
    // Assert 3: charged, receipted as a tool error under before_run, and refunded in full.
    let body = &charged["_meta"]["tollgate/receipt"]["body"];
    assert_eq!(
        (&body["outcome"], &body["charge"]),
        (&json!("tool_error"), &json!("before_run")),
        "{charged}"
    );
    let refund = &body["refund"];
    assert_eq!(refund["status"], "sent", "{charged}");
    assert_eq!(refund["from"], pay_to.to_checksum(None));
    assert_eq!(refund["amount"], PRICE.to_string());
    assert_eq!(before - app.balance(payer.address()).await, U256::from(PRICE), "the refund came back");
    assert_eq!(app.balance(pay_to).await, before_pay_to, "paid, then refunded");
    // The holder's audit reconciles the refund with its own transfer on chain.
    app.state.receipts.checkpoint(app.clock.now_unix()).await.unwrap();
    let state = dir.path().join("audit.json");
    let request = tollgate::audit::AuditRequest {
        wallet: &payer,
        server: &app.base_url(),
        rpc: &app.chain.anvil.endpoint(),
        state_file: state,
    };
    let report = tollgate::audit::audit(&request).await.unwrap();
    assert!(report.ok(), "{}", tollgate::audit::render(&report));
    assert_eq!(report.receipts.iter().filter_map(|r| r.refund.as_deref()).collect::<Vec<_>>(), ["ok"]);
    app.shutdown().await;
}

#[tokio::test]
async fn a_refund_that_cannot_be_sent_is_recorded_as_owed_and_fails_the_audit() {
    // Arrange: the refund wallet holds no USDC (anvil account #5 never received any).
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let command = vec![python().await.display().to_string(), script(), "stdio".into(), "0".into()];
    let mut u = upstream("py");
    u.prefix = "pre_".into();
    u.prices.insert("broken".into(), rule(ChargePolicy::BeforeRun, true));
    u.command = [command, vec![calls.display().to_string()]].concat();
    let app = spawn_app_with(move |c: &mut Config| {
        c.upstream = vec![u];
        c.tools.refund_key = DEV_KEYS[5].to_owned().into();
    })
    .await;
    let payer = app.payer();
    let args = json!({ "text": "x" });
    let before = app.balance(payer.address()).await;
    // Act
    let charged = app
        .pay("pre_broken", args.clone(), &app.sign(&payer, &app.requirements("pre_broken", args).await))
        .await;
    // Assert: charged, and the receipt says the refund failed (the payer is owed it).
    let refund = &charged["_meta"]["tollgate/receipt"]["body"]["refund"];
    assert_eq!(refund["status"], "failed", "{charged}");
    assert!(refund["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(before - app.balance(payer.address()).await, U256::from(PRICE));
    app.state.receipts.checkpoint(app.clock.now_unix()).await.unwrap();
    let request = tollgate::audit::AuditRequest {
        wallet: &payer,
        server: &app.base_url(),
        rpc: &app.chain.anvil.endpoint(),
        state_file: dir.path().join("audit.json"),
    };
    let report = tollgate::audit::audit(&request).await.unwrap();
    assert!(
        report.problems.iter().any(|p| matches!(p, tollgate::audit::Problem::RefundOwed { .. })),
        "{}",
        tollgate::audit::render(&report)
    );
    app.shutdown().await;
}

/// Moves all of the payer's USDC to anvil account #4 with a second authorization, submitted by
/// a third party: the payer empties the wallet.
async fn drain(app: &TestApp) {
    let payer = app.payer();
    let balance = app.balance(payer.address()).await;
    let mut requirements = app.requirements("counted", json!({})).await;
    requirements.amount = balance.to_string();
    requirements.pay_to =
        tollgate::chain::parse_private_key(DEV_KEYS[4]).unwrap().address().to_checksum(None);
    let params = SignParams::standard(app.clock.now_unix(), requirements.max_timeout_seconds);
    let payload = sign_payment(&payer, &requirements, None, &params).unwrap();
    submit_on_chain(&app.chain.anvil.endpoint(), app.chain.token, &payload).await;
    assert_eq!(app.balance(payer.address()).await, U256::ZERO);
}

#[tokio::test]
async fn a_payer_who_empties_the_wallet_during_an_on_success_run_gets_no_result_and_is_penalised() {
    // Arrange: every tool is on_success; `slow` runs for 2 s.
    let app = spawn_app_with(|c| c.tools.charge = ChargePolicy::OnSuccess).await;
    let payer = app.payer();
    let pay_to_before = app.balance(app.chain.pay_to).await;
    let args = json!({ "secs": 2 });
    let payload = app.sign(&payer, &app.requirements("slow", args.clone()).await);
    let call = tokio::spawn({
        let (mcp, meta) = (app.sessionless(), json!({ "x402/payment": payload }));
        async move { mcp.call_tool("slow", args, Some(meta)).await }
    });
    // Act: once the handler runs (the claim and the chain checks passed), the wallet is emptied.
    let started = async {
        while app.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), started).await.expect("the handler starts");
    drain(&app).await;
    let answer = call.await.unwrap();
    // Assert: no result served, nothing charged, recorded and counted.
    let body = &answer["structuredContent"];
    assert_eq!(body["error"], "settlement_failed_result_withheld", "{answer}");
    assert_eq!(body["charged"], false);
    assert!(body.get("slept").is_none() && body.get("run").is_none(), "the result is withheld: {answer}");
    assert_eq!(app.balance(app.chain.pay_to).await, pay_to_before);
    assert_eq!(receipt_count(&app).await, 0);
    let metrics = reqwest::get(format!("{}/metrics", app.base_url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_unpaid_runs_total{tool=\"slow\""), "{metrics}");
    // The wallet is refused paid calls for a while, on the wallet axis, before any chain check…
    let again = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let refused = app.pay("counted", json!({}), &again).await;
    let body = &refused["structuredContent"];
    assert_eq!((&body["error"], &body["axis"]), (&json!("rate_limited"), &json!("wallet")), "{refused}");
    assert!(body["retry_after_seconds"].as_u64().unwrap() > 0);
    // …and no longer after the penalty (then it is its empty balance that refuses it).
    app.advance_time(301).await;
    let later = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let refused = app.pay("counted", json!({}), &later).await;
    assert_eq!(refused["structuredContent"]["error"], "invalid_exact_evm_insufficient_balance", "{refused}");
    app.shutdown().await;
}

#[tokio::test]
async fn an_on_success_payment_that_could_not_settle_runs_nothing() {
    // Arrange: on_success, and a payer that holds no USDC.
    let app = spawn_app_with(|c| c.tools.charge = ChargePolicy::OnSuccess).await;
    let stranger = alloy::signers::local::PrivateKeySigner::random();
    let payload = app.sign(&stranger, &app.requirements("counted", json!({})).await);
    // Act
    let refused = app.pay("counted", json!({}), &payload).await;
    // Assert: refused before the handler, nothing charged, the claim released.
    assert_eq!(refused["structuredContent"]["error"], "invalid_exact_evm_insufficient_balance", "{refused}");
    assert_eq!(app.runs(), 0);
    assert_eq!(receipt_count(&app).await, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn an_on_success_payment_resent_while_it_settles_never_runs_the_handler_twice() {
    // Arrange: on_success; the chain holds the settlement in its mempool.
    let app = spawn_app_with(|c| c.tools.charge = ChargePolicy::OnSuccess).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let first = tokio::spawn({
        let (mcp, meta) = (app.sessionless(), json!({ "x402/payment": payload.clone() }));
        async move { mcp.call_tool("counted", json!({}), Some(meta)).await }
    });
    let settling = async {
        loop {
            let rows = app.state.store.unresolved(10).await.unwrap();
            if rows.iter().any(|r| r.tx_hash.is_some()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), settling).await.expect("the settlement is out");
    // Act: the payer resends the same payment while its settlement waits, and again the moment
    // its block comes (before the first request's next confirmation poll).
    let waiting = app.pay("counted", json!({}), &payload).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    let resent = app.pay("counted", json!({}), &payload).await;
    let first = first.await.unwrap();
    let again = app.pay("counted", json!({}), &payload).await;
    // Assert: one run, one charge; the resend was told to wait, then got the same answer.
    assert_eq!(app.runs(), 1, "resent: {waiting} then {resent}");
    assert_ne!(resent["structuredContent"]["run"], json!(2), "{resent}");
    assert_eq!(first["structuredContent"]["run"], 1, "{first}");
    assert_eq!(again["structuredContent"], first["structuredContent"], "{again}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(crate::helpers::COUNTED_PRICE));
    app.shutdown().await;
}

#[tokio::test]
async fn an_on_success_authorization_that_would_expire_during_the_run_is_refused_before_it() {
    // Arrange: on_success (run up to 60 s, settle up to 30 s); an authorization valid for 30 s.
    let app = spawn_app_with(|c| c.tools.charge = ChargePolicy::OnSuccess).await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({})).await;
    let mut params = SignParams::standard(app.clock.now_unix(), requirements.max_timeout_seconds);
    params.valid_before = app.clock.now_unix() + 30;
    let payload = sign_payment(&payer, &requirements, None, &params).unwrap();
    // Act
    let refused = app.pay("counted", json!({}), &payload).await;
    // Assert: a re-challenge naming validBefore, and nothing ran.
    let body = &refused["structuredContent"];
    assert_eq!(body["error"], "invalid_exact_evm_payload_authorization_valid_before", "{refused}");
    assert!(body["accepts"].is_array());
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}
