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

use crate::helpers::{COUNTED_PRICE, TestApp, spawn_app, spawn_app_with};

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
    /// What `/supported` answers.
    supported: Value,
    /// When set, every request must carry a valid CDP JWT.
    cdp: Option<Arc<CdpCheck>>,
}

impl Fake {
    fn new(mode: Mode, rpc: String, settles: Arc<AtomicUsize>) -> Fake {
        Fake { mode, rpc, settles, supported: supports(LOCAL_NETWORK), cdp: None }
    }
}

/// The network `spawn_app` serves (anvil's chain id).
const LOCAL_NETWORK: &str = "eip155:31337";
/// The signer the fake facilitator's `/supported` names (anvil's dev account #3, which
/// `submit_on_chain` settles with).
const FACILITATOR_SIGNER: &str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";

fn supports(network: &str) -> Value {
    json!({
        "kinds": [{ "x402Version": 2, "scheme": "exact", "network": network }],
        "extensions": [],
        "signers": { "eip155:*": [FACILITATOR_SIGNER] },
    })
}

/// Starts the fake facilitator on port 0; returns its base URL.
async fn fake_facilitator(fake: Fake) -> String {
    crate::helpers::serve_on_loopback(fake_router(fake)).await
}

/// The fake facilitator's routes: `/verify`, `/settle` and `/supported`, behind its CDP check.
fn fake_router(fake: Fake) -> Router {
    Router::new()
        .route("/verify", post(verify))
        .route("/settle", post(settle))
        .route(
            "/supported",
            axum::routing::get(|State(fake): State<Fake>| async move { Json(fake.supported) }),
        )
        .layer(axum::middleware::from_fn_with_state(fake.clone(), cdp_gate))
        .with_state(fake)
}

/// What CDP checks on a bearer JWT, done by an independent implementation (`jsonwebtoken`'s
/// verifier with the key's public half): signature, `kid`/`sub`, `iss`/`aud`, `nbf`/`exp`
/// against this facilitator's clock, that `uris` names this very request, and that no nonce
/// is used twice.
struct CdpCheck {
    key_id: String,
    key: jsonwebtoken::DecodingKey,
    algorithm: jsonwebtoken::Algorithm,
    /// This facilitator's clock runs this far ahead of the real one.
    skew_secs: u64,
    nonces: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Every token received, with the endpoint it was sent to.
    seen: std::sync::Mutex<Vec<(String, String)>>,
}

impl CdpCheck {
    fn refusal(&self, method: &str, host: &str, path: &str, authorization: Option<&str>) -> Option<String> {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
            return Some("no bearer token".into());
        };
        self.seen.lock().unwrap().push((path.to_owned(), token.to_owned()));
        let header = jsonwebtoken::decode_header(token).ok()?;
        let mut validation = jsonwebtoken::Validation::new(self.algorithm);
        validation.set_audience(&["cdp_service"]);
        validation.set_issuer(&["cdp"]);
        validation.set_required_spec_claims(&["exp", "nbf", "sub", "aud", "iss"]);
        // Expiry is checked below against this facilitator's (skewed) clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let claims = match jsonwebtoken::decode::<Value>(token, &self.key, &validation) {
            Ok(data) => data.claims,
            Err(e) => return Some(format!("bad token: {e}")),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
            + self.skew_secs;
        let (nbf, exp) = (claims["nbf"].as_u64().unwrap_or(u64::MAX), claims["exp"].as_u64().unwrap_or(0));
        if now >= exp || now + 5 < nbf {
            return Some("expired".into());
        }
        if exp - nbf > 300 || header.kid.as_deref() != Some(&self.key_id) || claims["sub"] != self.key_id {
            return Some("wrong key or lifetime".into());
        }
        if claims["uris"] != json!([format!("{method} {host}{path}")]) {
            return Some("token for another endpoint".into());
        }
        let nonce = header.nonce.unwrap_or_default();
        if nonce.len() < 16 || !self.nonces.lock().unwrap().insert(nonce) {
            return Some("nonce reused".into());
        }
        None
    }
}

async fn cdp_gate(
    State(fake): State<Fake>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(cdp) = &fake.cdp {
        let authorization = request.headers().get("authorization").and_then(|v| v.to_str().ok());
        let path = request.uri().path().to_owned();
        if let Some(why) = cdp.refusal(request.method().as_str(), "127.0.0.1", &path, authorization) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({ "errorType": "unauthorized", "errorMessage": why })),
            )
                .into_response();
        }
    }
    next.run(request).await
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
    let url = fake_facilitator(Fake::new(mode, app.chain.anvil.endpoint(), settles.clone())).await;
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

/// A CDP API key as the portal issues it, and the fake facilitator's check for it.
fn cdp_key(ec: bool, skew_secs: u64) -> (String, CdpCheck) {
    use base64::Engine as _;
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    let b64url = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let (secret, key, algorithm) = if ec {
        let key = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let point = key.public_key().to_encoded_point(false);
        let pem = key.to_sec1_pem(p256::pkcs8::LineEnding::LF).unwrap().to_string();
        let decoding = jsonwebtoken::DecodingKey::from_ec_components(
            &b64url(point.x().unwrap()),
            &b64url(point.y().unwrap()),
        );
        (pem, decoding.unwrap(), jsonwebtoken::Algorithm::ES256)
    } else {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let public = key.verifying_key().to_bytes();
        let both = [key.to_bytes().as_slice(), public.as_slice()].concat();
        let secret = base64::engine::general_purpose::STANDARD.encode(both);
        let decoding = jsonwebtoken::DecodingKey::from_ed_components(&b64url(&public)).unwrap();
        (secret, decoding, jsonwebtoken::Algorithm::EdDSA)
    };
    let key_id = format!("organizations/test/apiKeys/{}", if ec { "ec" } else { "ed" });
    let check = CdpCheck {
        key_id: key_id.clone(),
        key,
        algorithm,
        skew_secs,
        nonces: Default::default(),
        seen: Default::default(),
    };
    (secret, check)
}

/// tollgate configured for a CDP-authenticated fake facilitator: the config, and the fake's URL.
async fn cdp_config(
    app: &TestApp,
    cdp: Arc<CdpCheck>,
    secret: &str,
    settles: Arc<AtomicUsize>,
) -> (tollgate::config::Config, String) {
    let mut fake = Fake::new(Mode::Settle, app.chain.anvil.endpoint(), settles);
    fake.cdp = Some(cdp.clone());
    let url = fake_facilitator(fake).await;
    let mut config = app.state.config.clone();
    config.payment.settler = SettlerKind::Facilitator;
    config.payment.facilitator.url = url.clone();
    config.payment.facilitator.cdp_key_id = cdp.key_id.clone();
    config.payment.facilitator.cdp_key_secret = secret.to_owned().into();
    (config, url)
}

#[tokio::test]
async fn cdp_jwt_auth_settles_with_either_key_kind_and_each_token_is_fresh_and_bound_to_its_endpoint() {
    for ec in [false, true] {
        // Arrange: a facilitator that checks every request's JWT as CDP does.
        let mut app = spawn_app_with(|c| c.payment.settle_timeout_secs = 5).await;
        let (secret, check) = cdp_key(ec, 0);
        let cdp = Arc::new(check);
        let settles = Arc::new(AtomicUsize::new(0));
        let (config, url) = cdp_config(&app, cdp.clone(), &secret, settles.clone()).await;
        app.replace_server(config).await;
        let payer = app.payer();
        let before = app.balance(payer.address()).await;
        // Act
        let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
        let result = app.pay("counted", json!({}), &payload).await;
        // Assert: accepted at /supported, /verify and /settle, each with its own token.
        assert_eq!(result["isError"], false, "ec={ec}: {result}");
        assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
        assert_eq!(settles.load(Ordering::SeqCst), 1);
        let seen = cdp.seen.lock().unwrap().clone();
        let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/supported", "/verify", "/settle"], "ec={ec}");
        // A token cannot be replayed: not verbatim (its nonce), not at another endpoint.
        let verify_token = &seen[1].1;
        let http = reqwest::Client::new();
        for (path, refusal) in [("verify", "nonce reused"), ("settle", "token for another endpoint")] {
            let answer = http
                .post(format!("{url}/{path}"))
                .bearer_auth(verify_token)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 401);
            let body: Value = answer.json().await.unwrap();
            assert_eq!(body["errorMessage"], refusal, "ec={ec}");
        }
        app.shutdown().await;
    }
}

#[tokio::test]
async fn a_refused_cdp_token_stops_start_up_with_a_clear_error_and_charges_nothing() {
    let app = spawn_app().await;
    // The facilitator's clock is 3 minutes ahead: every token we sign is already expired there.
    let (secret, check) = cdp_key(false, 180);
    let cdp = Arc::new(check);
    let (config, _) = cdp_config(&app, cdp.clone(), &secret, Default::default()).await;
    let deps = tollgate::app::Deps::default();
    let err = tollgate::app::App::build_with(config.clone(), deps).await.err().expect("start-up refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("refused our credentials (HTTP 401: expired)") && message.contains("cdp_key_id"),
        "{message}"
    );
    assert!(!message.contains(&secret), "the secret never appears");
    // Signed with another key than the facilitator knows: refused the same way.
    let (other_secret, _) = cdp_key(false, 0);
    let (_, fresh) = cdp_key(false, 0);
    let (mut config, _) = cdp_config(&app, Arc::new(fresh), &secret, Default::default()).await;
    config.payment.facilitator.cdp_key_secret = other_secret.into();
    let err = tollgate::app::App::build_with(config, tollgate::app::Deps::default()).await.err().unwrap();
    assert!(format!("{err:#}").contains("HTTP 401"), "{err:#}");
    app.shutdown().await;
}

#[tokio::test]
async fn start_up_checks_the_facilitator_supports_our_network_and_publishes_its_signers() {
    let mut app = spawn_app().await;
    // A facilitator for another chain only: refused at start, naming what it offers.
    let mut fake = Fake::new(Mode::Settle, app.chain.anvil.endpoint(), Default::default());
    fake.supported = supports("eip155:8453");
    let mut config = app.state.config.clone();
    config.payment.settler = SettlerKind::Facilitator;
    config.payment.facilitator.url = fake_facilitator(fake).await;
    let err =
        tollgate::app::App::build_with(config.clone(), tollgate::app::Deps::default()).await.err().unwrap();
    let message = format!("{err:#}");
    assert!(message.contains("does not settle x402 v2 `exact` payments on eip155:31337"), "{message}");
    assert!(message.contains("v2 exact on eip155:8453"), "{message}");
    // One that does: it starts, /readyz reports the facilitator, and its signers are published.
    config.payment.facilitator.url =
        fake_facilitator(Fake::new(Mode::Settle, app.chain.anvil.endpoint(), Default::default())).await;
    app.replace_server(config).await;
    let (status, report) = crate::helpers::readyz_until(&app.base_url(), 200).await;
    assert_eq!((status, &report["checks"]["facilitator"]), (200, &json!("ok")), "{report}");
    let listing: Value =
        reqwest::get(format!("{}/.well-known/x402", app.base_url())).await.unwrap().json().await.unwrap();
    assert_eq!(listing["settlement"]["by"], "facilitator signer");
    assert_eq!(listing["settlement"]["signers"], json!([FACILITATOR_SIGNER]));
    app.shutdown().await;
}

#[tokio::test]
async fn a_facilitator_down_at_start_leaves_the_server_up_but_unready_until_it_answers() {
    let mut app = spawn_app().await;
    // Nothing listens there yet.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut config = app.state.config.clone();
    config.payment.settler = SettlerKind::Facilitator;
    config.payment.facilitator.url = format!("http://{addr}");
    app.replace_server(config).await;
    let (status, report) = crate::helpers::readyz_until(&app.base_url(), 503).await;
    assert_eq!(status, 503, "{report}");
    assert!(report["checks"]["facilitator"].as_str().unwrap().contains("unreachable"), "{report}");
    // It comes up: the next probe finds it, and the server turns ready.
    let fake = Fake::new(Mode::Settle, app.chain.anvil.endpoint(), Default::default());
    let router = fake_router(fake);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let (status, report) = crate::helpers::readyz_until(&app.base_url(), 200).await;
    assert_eq!((status, &report["checks"]["facilitator"]), (200, &json!("ok")), "{report}");
    app.shutdown().await;
}
