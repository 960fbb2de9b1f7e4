//! Any request to `/mcp` — any method, headers, session id, payment header and body — through
//! the whole server in process (ceiling, router, rmcp transport, tool dispatch, payment gate,
//! SQLite store), with a chain that cannot be reached. Every answer must keep the invariants in
//! `fuzz/harness/mcp.rs`: no panic, no 5xx, no paid result, valid JSON.
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tollgate::app::{App, Deps};
use tollgate::ceiling::guard::Guard;
use tollgate::chain::anvil::DEV_KEYS;
use tollgate::config::Config;
use tower::ServiceExt;

#[path = "../harness/mcp.rs"]
mod harness;

struct Harness {
    runtime: tokio::runtime::Runtime,
    guard: Guard,
    payment: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::load(None).expect("default config");
        config.server.bind = "127.0.0.1:0".parse().unwrap();
        config.database.url = format!("sqlite://{}", dir.path().join("fuzz.db").display()).into();
        // Port 9 (discard) refuses connections: nothing can settle, so nothing may be served.
        config.network.rpc_url = "http://127.0.0.1:9".to_owned().into();
        config.network.asset = "0x5FbDB2315678afecb367f032d93F642f64180aa3".into();
        config.payment.pay_to = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8".into();
        config.payment.relayer_key = DEV_KEYS[1].to_owned().into();
        config.receipts.key = hex::encode([7u8; 32]).into();
        // Generous, so inputs explore the server rather than the 429.
        config.ceiling.burst = 1_000_000;
        config.ceiling.per_second = 1_000_000;
        let (guard, payment) = runtime.block_on(async {
            let app = App::build_with(config, Deps::default()).await.expect("app builds");
            let router = tollgate::router::router(app.state(), Default::default());
            let guard = router.for_peer("127.0.0.1:50000".parse().unwrap());
            let payment = signed_payment(&guard).await;
            (guard, payment)
        });
        Harness { runtime, guard, payment, _dir: dir }
    })
}

/// A real payment for `sha256`, signed against the server's own challenge.
async fn signed_payment(guard: &Guard) -> Vec<u8> {
    let call = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": { "name": "sha256", "arguments": { "text": "fuzz" } }
    });
    let request = http::Request::post("/mcp")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Body::from(call.to_string()))
        .unwrap();
    let response = guard.clone().oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).expect("challenge is JSON");
    let challenge = tollgate::client::payment_required(&answer["result"])
        .unwrap_or_else(|| panic!("a challenge, not {answer}"));
    let requirements = serde_json::from_value(challenge["accepts"][0].clone()).unwrap();
    let signer = tollgate::chain::parse_private_key(DEV_KEYS[6]).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let params = tollgate::client::sign::SignParams::standard(now, 3600);
    let payment = tollgate::client::sign::sign_payment(&signer, &requirements, None, &params).unwrap();
    serde_json::to_vec(&payment).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let request = harness::build(data, &h.payment).map(Body::from);
    h.runtime.block_on(async {
        let response = h.guard.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        // An event stream (GET with a session) may stay open: read what comes at once.
        let body = match tokio::time::timeout(Duration::from_millis(20), response.into_body().collect()).await {
            Ok(Ok(collected)) => collected.to_bytes().to_vec(),
            Ok(Err(_)) | Err(_) => return,
        };
        if let Err(violation) = harness::check(status, &content_type, &body) {
            panic!("{violation}");
        }
    });
});
