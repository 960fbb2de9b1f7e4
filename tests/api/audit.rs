//! Receipts, the transparency log and `tollgate audit`: an honest server passes, and each kind
//! of dishonesty is caught with a clear message.

use std::sync::Arc;

use alloy::primitives::Address;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::process::Command;
use tollgate::audit::{AuditOptions, AuditReport, AuditRequest, Problem, audit, audit_with, render};
use tollgate::clock::{Clock, ManualClock, SharedClock};

use crate::helpers::{TestApp, spawn_app, spawn_app_with, submit_on_chain};

/// Makes `n` paid calls as the demo payer; returns the results.
async fn paid_calls(app: &TestApp, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..n {
        let payload = app.sign(&app.payer(), &app.requirements("counted", json!({})).await);
        let result = app.pay("counted", json!({ "text": format!("call {i}") }), &payload).await;
        assert_eq!(result["isError"], false, "{result}");
        out.push(result);
    }
    out
}

pub(crate) async fn checkpoint(app: &TestApp) {
    app.state.receipts.checkpoint(app.clock.now_unix()).await.unwrap();
}

pub(crate) async fn run_audit(app: &TestApp, server: &str, state: &std::path::Path) -> AuditReport {
    let payer = app.payer();
    let rpc = app.chain.anvil.endpoint();
    audit(&AuditRequest { wallet: &payer, server, rpc: &rpc, state_file: state.to_owned() }).await.unwrap()
}

async fn run_audit_with(
    app: &TestApp,
    server: &str,
    state: &std::path::Path,
    options: &AuditOptions,
) -> AuditReport {
    let (payer, rpc) = (app.payer(), app.chain.anvil.endpoint());
    let request = AuditRequest { wallet: &payer, server, rpc: &rpc, state_file: state.to_owned() };
    audit_with(&request, options).await.unwrap()
}

#[tokio::test]
async fn a_paid_result_carries_a_signed_receipt_that_verifies_against_the_published_key() {
    let app = spawn_app().await;
    let results = paid_calls(&app, 2).await;
    let listing: Value =
        reqwest::get(format!("{}/.well-known/x402", app.base_url())).await.unwrap().json().await.unwrap();
    let key = tollgate::receipt::keys::parse_public(listing["receiptKeys"][0]["publicKey"].as_str().unwrap())
        .unwrap();
    let first: tollgate::receipt::SignedReceipt =
        serde_json::from_value(results[0]["_meta"]["tollgate/receipt"].clone()).unwrap();
    let second: tollgate::receipt::SignedReceipt =
        serde_json::from_value(results[1]["_meta"]["tollgate/receipt"].clone()).unwrap();
    assert!(first.verify(&key) && second.verify(&key));
    assert_eq!((first.body.payer_seq, second.body.payer_seq), (1, 2));
    assert_eq!(second.body.prev, hex::encode(first.leaf_hash()), "receipts chain per payer");
    assert_eq!(first.body.tx, results[0]["_meta"]["x402/payment-response"]["transaction"]);
    assert_eq!(first.body.amount, crate::helpers::COUNTED_PRICE.to_string());
    assert_eq!(first.body.outcome, "ok");
    assert_eq!(listing["tools"].as_array().unwrap().len(), 5, "the listing names the tools");
    app.shutdown().await;
}

#[tokio::test]
async fn an_honest_server_passes_the_audit_and_stays_consistent_across_audits() {
    // Arrange
    let app = spawn_app().await;
    let state = app.dir.path().join("audit.json");
    paid_calls(&app, 3).await;
    checkpoint(&app).await;
    // Act 1
    let first = run_audit(&app, &app.base_url(), &state).await;
    // Assert 1
    assert!(first.ok(), "{}", tollgate::audit::render(&first));
    assert_eq!(first.receipts.len(), 3);
    assert!(first.receipts.iter().all(|r| r.signature_ok && r.on_chain && r.in_log == Some(true)));
    // Settled by the signer the server publishes (its relayer here).
    assert!(first.receipts.iter().all(|r| r.settled_by.as_deref() == Some("server")), "{first:?}");
    assert_eq!(first.checkpoint_size, 3);
    // Act 2: more calls, one of them not yet checkpointed.
    paid_calls(&app, 2).await;
    checkpoint(&app).await;
    paid_calls(&app, 1).await;
    let second = run_audit(&app, &app.base_url(), &state).await;
    // Assert 2
    assert!(second.ok(), "{}", tollgate::audit::render(&second));
    assert_eq!(second.previous_checkpoint_size, Some(3), "checked against the saved checkpoint");
    assert_eq!(second.checkpoint_size, 5);
    assert_eq!(second.receipts.last().unwrap().in_log, None, "not yet integrated is not a failure");
    app.shutdown().await;
}

/// Rewrites one answer of the real server: (path, status, body) in, (status, body) out.
type Mutation = Arc<dyn Fn(&str, StatusCode, Value) -> (StatusCode, Value) + Send + Sync>;
/// Recognises the problem a tampering must produce.
type Expect = fn(&Problem) -> bool;

/// A dishonest front: forwards to the real server and rewrites its JSON answers.
async fn tampering_proxy(upstream: String, mutate: Mutation) -> String {
    async fn forward(State((upstream, mutate)): State<(String, Mutation)>, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
        let body: Bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let response = reqwest::Client::new()
            .request(parts.method.clone(), format!("{upstream}{path}"))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        let (status, changed) = mutate(parts.uri.path(), status, value);
        (status, axum::Json(changed)).into_response()
    }
    let router = axum::Router::new().fallback(forward).with_state((upstream, mutate));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

fn on(path: &'static str, f: impl Fn(&mut Value) + Send + Sync + 'static) -> Mutation {
    Arc::new(move |p, status, mut v| {
        if p == path {
            f(&mut v);
        }
        (status, v)
    })
}

/// Answers `path` itself, with `status` and `body`, as a server hiding that endpoint would.
fn answer(path: &'static str, status: StatusCode, body: Value) -> Mutation {
    Arc::new(move |p, real_status, v| if p == path { (status, body.clone()) } else { (real_status, v) })
}

/// The front's listing names `decoy` as both payTo and asset.
fn decoy_listing(decoy: Address) -> Mutation {
    on("/.well-known/x402", move |v| {
        v["payTo"] = json!(decoy.to_checksum(None));
        v["asset"] = json!(decoy.to_checksum(None));
    })
}

#[tokio::test]
async fn each_kind_of_tampering_is_caught_with_a_clear_message() {
    // Arrange: an honest log of three receipts.
    let app = spawn_app().await;
    paid_calls(&app, 3).await;
    checkpoint(&app).await;
    let other_key = hex::encode(ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key().as_bytes());
    let cases: Vec<(&str, Mutation, Expect)> = vec![
        (
            "a changed receipt field",
            on("/log/receipts", |v| v["receipts"][1]["receipt"]["body"]["amount"] = json!("1")),
            |p| matches!(p, Problem::BadSignature { payer_seq: 2 }),
        ),
        (
            "a dropped receipt",
            on("/log/receipts", |v| {
                v["receipts"].as_array_mut().unwrap().remove(1);
            }),
            |p| matches!(p, Problem::SeqGap { expected: 2, found: 3 }),
        ),
        (
            "two receipts with the same payer_seq",
            on("/log/receipts", |v| {
                let copy = v["receipts"][1].clone();
                v["receipts"].as_array_mut().unwrap().insert(2, copy);
            }),
            |p| matches!(p, Problem::SeqFork { payer_seq: 2 }),
        ),
        (
            "a signature by an unknown key",
            on("/.well-known/x402", move |v| v["receiptKeys"][0]["publicKey"] = json!(other_key.clone())),
            |p| matches!(p, Problem::UnknownKey { .. }),
        ),
    ];
    for (why, mutation, expected) in cases {
        // Act
        let proxy = tampering_proxy(app.base_url(), mutation).await;
        let state = app.dir.path().join(format!("{}.json", why.replace(' ', "_")));
        let report = run_audit(&app, &proxy, &state).await;
        // Assert
        assert!(!report.ok(), "{why} went unnoticed");
        assert!(report.problems.iter().any(expected), "{why}: {:?}", report.problems);
        let text = tollgate::audit::render(&report);
        assert!(text.contains("verdict: FAILED"), "{text}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_log_that_rewrote_history_between_two_audits_is_caught() {
    // Arrange: an honest first audit saves the checkpoint.
    let app = spawn_app().await;
    let state = app.dir.path().join("audit.json");
    paid_calls(&app, 3).await;
    checkpoint(&app).await;
    assert!(run_audit(&app, &app.base_url(), &state).await.ok());
    paid_calls(&app, 2).await;
    checkpoint(&app).await;
    // The server (holding its own key) now signs a head over a history with leaf 0 rewritten.
    let key = tollgate::receipt::keys::parse_seed(
        tollgate::config::secret_opt(&app.state.config.receipts.key).unwrap(),
    )
    .unwrap();
    let signer = Arc::new(tollgate::receipt::ReceiptSigner::new(key));
    let mut leaves: Vec<_> = app.state.store.leaf_hashes(0, 5).await.unwrap();
    leaves[0] = hex::encode(tollgate::receipt::merkle::leaf_hash(b"rewritten"));
    let leaves: Vec<[u8; 32]> = leaves.iter().map(|h| hex::decode(h).unwrap().try_into().unwrap()).collect();
    let fake_root = hex::encode(tollgate::receipt::merkle::root(&leaves));
    let mutation = on("/log/checkpoint", move |v| {
        v["body"]["root"] = json!(fake_root.clone());
        let text = tollgate::receipt::canonical(&v["body"]);
        v["signature"] = json!(signer.sign(text.as_bytes()));
    });
    let proxy = tampering_proxy(app.base_url(), mutation).await;
    // Act
    let report = run_audit(&app, &proxy, &state).await;
    // Assert
    assert!(
        report.problems.iter().any(|p| matches!(p, Problem::LogRewritten { previous_size: 3, size: 5 })),
        "{:?}",
        report.problems
    );
    assert!(tollgate::audit::render(&report).contains("rewrote history"));
    app.shutdown().await;
}

#[tokio::test]
async fn a_transfer_on_chain_without_a_receipt_is_caught() {
    let app = spawn_app().await;
    paid_calls(&app, 1).await;
    // The payer's authorization to payTo is spent on chain, but no receipt was ever issued.
    let payload = app.sign(&app.payer(), &app.requirements("counted", json!({})).await);
    crate::helpers::submit_on_chain(&app.chain.anvil.endpoint(), app.chain.token, &payload).await;
    checkpoint(&app).await;
    let report = run_audit(&app, &app.base_url(), &app.dir.path().join("a.json")).await;
    assert!(
        report.problems.iter().any(|p| matches!(p, Problem::TransferWithoutReceipt { .. })),
        "{:?}",
        report.problems
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_receipt_without_a_transfer_is_caught() {
    // Arrange: the server signs and logs a receipt for a payment that never happened.
    let app = spawn_app().await;
    paid_calls(&app, 1).await;
    let payer = app.payer();
    let fake = tollgate::store::NewPayment {
        network: app.state.network.caip2.clone(),
        asset: app.chain.token,
        payer: payer.address(),
        nonce: alloy::primitives::B256::repeat_byte(0xab),
        payload_hash: "fake".into(),
        payment_id: None,
        tool: "counted".into(),
        amount: tollgate::money::UsdcAmount::from_atomic(999),
        valid_before: 0,
        payload_json: "{}".into(),
        args_json: None,
        args_hash: String::new(),
        price_terms: None,
        now: 0,
    };
    let tollgate::store::Claim::Won(row) = app.state.store.claim(&fake).await.unwrap() else { panic!() };
    let settlement = tollgate::payment::gate::Settlement {
        row_id: row.id,
        transaction: alloy::primitives::B256::repeat_byte(0xcd),
        block: 1,
        payer: payer.address(),
        network: app.state.network.caip2.clone(),
        asset: row.asset,
        amount: tollgate::money::UsdcAmount::from_atomic(999),
        nonce: row.nonce,
        leased: false,
    };
    let result = rmcp::model::CallToolResult::structured(json!({ "forged": true }));
    let input = tollgate::receipt::ReceiptInput {
        tool: "counted",
        args: &Default::default(),
        result: &result,
        settlement: &settlement,
        pay_to: app.state.config.payment.pay_to.unwrap(),
        now: app.clock.now_unix(),
        terms: None,
        refund: None,
        cached_at: None,
    };
    app.state.receipts.issue(&input).await.unwrap();
    checkpoint(&app).await;
    // Act
    let report = run_audit(&app, &app.base_url(), &app.dir.path().join("a.json")).await;
    // Assert: signed and logged, yet no money moved: caught.
    assert!(
        report.problems.iter().any(|p| matches!(p, Problem::NoTransfer { payer_seq: 2, .. })),
        "{:?}",
        report.problems
    );
    app.shutdown().await;
}

#[tokio::test]
async fn listing_another_wallets_receipts_without_its_signature_is_refused() {
    let app = spawn_app().await;
    paid_calls(&app, 1).await;
    let (victim, intruder) = (app.payer(), PrivateKeySigner::random());
    let http = reqwest::Client::new();
    let challenge: Value = http
        .post(format!("{}/log/receipts/challenge", app.base_url()))
        .json(&json!({ "wallet": victim.address() }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = challenge["challenge"].as_str().unwrap();
    let ask = |signer: &PrivateKeySigner, text: &str| {
        let signature = signer.sign_message_sync(text.as_bytes()).unwrap();
        json!({
            "wallet": victim.address(),
            "challenge": text,
            "signature": format!("0x{}", hex::encode(signature.as_bytes())),
        })
    };
    let url = format!("{}/log/receipts", app.base_url());
    // The intruder signs the victim's challenge: refused.
    let refused = http.post(&url).json(&ask(&intruder, text)).send().await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"], "not_authorized");
    // A forged challenge (not issued by the server): refused.
    let forged = text.replace("token: ", "token: 00");
    assert_eq!(http.post(&url).json(&ask(&victim, &forged)).send().await.unwrap().status(), 403);
    // The victim itself: allowed — until the challenge expires.
    let mine = http.post(&url).json(&ask(&victim, text)).send().await.unwrap();
    assert_eq!(mine.status(), 200);
    assert_eq!(mine.json::<Value>().await.unwrap()["receipts"].as_array().unwrap().len(), 1);
    app.clock.advance(301);
    assert_eq!(http.post(&url).json(&ask(&victim, text)).send().await.unwrap().status(), 403);
    app.shutdown().await;
}

#[tokio::test]
async fn the_audit_and_receipts_verify_commands_report_and_exit_by_verdict() {
    let app = spawn_app().await;
    let results = paid_calls(&app, 2).await;
    checkpoint(&app).await;
    let key_file = app.dir.path().join("payer.key");
    let state = app.dir.path().join("cli-audit.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["audit", "--wallet", &app.payer().address().to_string(), "--server", &app.base_url()])
        .args(["--rpc", &app.chain.anvil.endpoint()])
        .arg("--key")
        .arg(&key_file)
        .arg("--state")
        .arg(&state)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verdict: OK — 2 receipts verified"), "{stdout}");
    // One receipt, offline.
    let listing: Value =
        reqwest::get(format!("{}/.well-known/x402", app.base_url())).await.unwrap().json().await.unwrap();
    let public_key = listing["receiptKeys"][0]["publicKey"].as_str().unwrap().to_owned();
    let file = app.dir.path().join("result.json");
    std::fs::write(&file, results[0].to_string()).unwrap();
    let verify = |file: std::path::PathBuf| {
        let public_key = public_key.clone();
        async move {
            Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args(["receipts", "verify"])
                .arg(file)
                .args(["--public-key", &public_key])
                .output()
                .await
                .unwrap()
        }
    };
    let ok = verify(file.clone()).await;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let mut tampered = results[0].clone();
    tampered["_meta"]["tollgate/receipt"]["body"]["tool"] = json!("sha256");
    std::fs::write(&file, tampered.to_string()).unwrap();
    let bad = verify(file).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("INVALID"));
    app.shutdown().await;
}

#[tokio::test]
async fn a_missing_checkpoint_fails_the_audit_and_says_so() {
    // Arrange: an honest log of two checkpointed receipts, behind fronts that hide the checkpoint.
    let app = spawn_app().await;
    paid_calls(&app, 2).await;
    checkpoint(&app).await;
    let cases = [("answered 404", StatusCode::NOT_FOUND), ("answered 503", StatusCode::SERVICE_UNAVAILABLE)];
    for (why, status) in cases {
        let hidden = json!({ "error": "no_checkpoint", "message": "the log has no checkpoint yet" });
        let proxy = tampering_proxy(app.base_url(), answer("/log/checkpoint", status, hidden)).await;
        let state = app.dir.path().join(format!("hidden-{}.json", status.as_u16()));
        // Act
        let report = run_audit(&app, &proxy, &state).await;
        // Assert
        let text = render(&report);
        assert!(!report.ok(), "a checkpoint that {why} passed the audit: {text}");
        assert!(text.contains("the log's signed checkpoint is missing"), "{why}: {text}");
        assert!(text.contains(&format!("HTTP {status}")), "{why}: the reason is named: {text}");
        assert!(!state.exists(), "{why}: a failed audit saves no checkpoint");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_receipt_served_with_an_unsigned_log_index_beyond_the_log_fails_the_audit() {
    // Arrange: three checkpointed receipts; the front moves the third's unsigned log_index past
    // any checkpoint, where the inclusion check used to be skipped.
    let app = spawn_app().await;
    paid_calls(&app, 3).await;
    checkpoint(&app).await;
    let absurd = on("/log/receipts", |v| v["receipts"][2]["log_index"] = json!(1_000_000_000_000u64));
    let proxy = tampering_proxy(app.base_url(), absurd).await;
    // Act
    let report = run_audit(&app, &proxy, &app.dir.path().join("a.json")).await;
    // Assert: refused, and the signed index is the one proven.
    let text = render(&report);
    assert!(!report.ok(), "an unsigned log index nobody signed passed the audit: {text}");
    assert!(text.contains("log index 1000000000000, but its signed body says 2"), "{text}");
    assert!(report.receipts.iter().all(|r| r.in_log == Some(true)), "{text}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_listing_that_names_another_pay_to_cannot_hide_a_payment_to_the_receipts_pay_to() {
    // Arrange: one paid call, then one more payment to the real payTo that never got a receipt.
    let app = spawn_app().await;
    paid_calls(&app, 1).await;
    let payload = app.sign(&app.payer(), &app.requirements("counted", json!({})).await);
    let orphan = submit_on_chain(&app.chain.anvil.endpoint(), app.chain.token, &payload).await;
    checkpoint(&app).await;
    let proxy = tampering_proxy(app.base_url(), decoy_listing(PrivateKeySigner::random().address())).await;
    let pay_to: Address = app.state.config.payment.pay_to.unwrap();
    // Act
    let report = run_audit(&app, &proxy, &app.dir.path().join("a.json")).await;
    // Assert: the receipt still matches its transfer, and the orphan payment is still found.
    let text = render(&report);
    assert!(report.receipts.iter().all(|r| r.on_chain), "the receipt's own payTo was scanned: {text}");
    assert_eq!(report.problems.len(), 1, "only the payment without a receipt: {text}");
    let orphan_named = format!("on-chain transfer {orphan} (nonce");
    let to_pay_to = format!("to {} has no receipt", pay_to.to_checksum(None));
    assert!(text.contains(&orphan_named) && text.contains(&to_pay_to), "{text}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_pay_to_the_holder_names_is_reconciled_though_no_receipt_or_listing_names_it() {
    // Arrange: the wallet's only payment has no receipt, and the front's listing names a decoy.
    let app = spawn_app().await;
    let payload = app.sign(&app.payer(), &app.requirements("counted", json!({})).await);
    let orphan = submit_on_chain(&app.chain.anvil.endpoint(), app.chain.token, &payload).await;
    let proxy = tampering_proxy(app.base_url(), decoy_listing(PrivateKeySigner::random().address())).await;
    let pay_to: Address = app.state.config.payment.pay_to.unwrap();
    let options = AuditOptions { pay_to: vec![pay_to], assets: vec![app.chain.token], ..Default::default() };
    // Act
    let report = run_audit_with(&app, &proxy, &app.dir.path().join("a.json"), &options).await;
    // Assert
    let found = |p: &Problem| matches!(p, Problem::TransferWithoutReceipt { tx, .. } if *tx == orphan);
    assert!(report.problems.iter().any(found), "{}", render(&report));
    app.shutdown().await;
}

#[tokio::test]
async fn a_receipt_kept_out_of_the_checkpoint_past_the_grace_fails_the_audit() {
    // Arrange: two checkpointed receipts, then a third; the background checkpointer stays idle.
    let app = spawn_app_with(|c| c.receipts.checkpoint_interval_secs = 3600).await;
    paid_calls(&app, 2).await;
    checkpoint(&app).await;
    paid_calls(&app, 1).await;
    let grace = 60;
    // (why, how long after the receipt the holder audits, the verdict)
    let cases = [("within the grace", grace, true), ("past the grace", grace + 1, false)];
    for (why, later, passes) in cases {
        let clock: SharedClock = Arc::new(ManualClock::new(app.clock.now_unix() + later));
        let options = AuditOptions { checkpoint_grace_secs: grace, clock, ..Default::default() };
        let state = app.dir.path().join(format!("{later}.json"));
        // Act
        let report = run_audit_with(&app, &app.base_url(), &state, &options).await;
        // Assert
        let text = render(&report);
        assert_eq!(report.ok(), passes, "{why}: {text}");
        assert_eq!(report.receipts[2].in_log, if passes { None } else { Some(false) }, "{why}: {text}");
        let said = if passes { "not yet checkpointed" } else { "missing from the latest checkpoint" };
        assert!(text.contains(&format!("receipt #3 (log index 2) is {said}")), "{why}: {text}");
    }
    app.shutdown().await;
}
