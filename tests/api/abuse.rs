//! Abuse of the paid path and of the public surface by a client that does not mean to pay:
//! throwaway wallets, and floods of the public log endpoints.

use std::sync::{Arc, Mutex};

use alloy::signers::local::PrivateKeySigner;
use serde_json::{Value, json};

use crate::helpers::{CountingRpc, Mcp, spawn_app_with};

/// Sends every payload for `counted` from `mcp`, 16 at a time; returns the results.
async fn pay_all(mcp: &Mcp, payloads: Vec<Value>) -> Vec<Value> {
    let queue = Arc::new(Mutex::new(payloads));
    let results = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (mcp, queue, results) = (mcp.clone(), queue.clone(), results.clone());
            tokio::spawn(async move {
                loop {
                    let Some(payload) = queue.lock().unwrap().pop() else { break };
                    let meta = json!({ "x402/payment": payload });
                    let result = mcp.call_tool("counted", json!({}), Some(meta)).await;
                    results.lock().unwrap().push(result);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

#[tokio::test]
async fn a_flood_of_unfunded_wallets_from_one_ip_cannot_become_rpc_load_and_an_honest_payer_still_pays() {
    // Arrange: a ceiling out of the way (the flood is slow enough for it), and every RPC call
    // tollgate makes counted at a proxy in front of the chain.
    let mut app = spawn_app_with(|c| {
        c.ceiling.burst = 100_000;
        c.ceiling.per_second = 100_000;
    })
    .await;
    let rpc = CountingRpc::start(&app.chain.anvil.endpoint()).await;
    let mut config = app.state.config.clone();
    config.network.rpc_url = rpc.url.clone().into();
    app.replace_server(config).await;
    let requirements = app.requirements("counted", json!({})).await;
    let payloads: Vec<Value> =
        (0..5_000).map(|_| app.sign(&PrivateKeySigner::random(), &requirements)).collect();
    let before = rpc.calls();
    // Act: 5,000 validly signed payments from 5,000 wallets holding nothing, from one IP.
    let results = pay_all(&app.sessionless(), payloads).await;
    let rpc_calls = rpc.calls() - before;
    // Assert: each was either re-challenged for its empty wallet (x402's answer: nothing was
    // taken) or, once the client's budget was spent, turned away before verification,
    // uncharged; so the RPC calls the flood caused stay bounded.
    assert_eq!(results.len(), 5_000);
    let error = |r: &Value| r["structuredContent"]["error"].as_str().unwrap_or_default().to_owned();
    let unfunded = results.iter().filter(|r| error(r) == "invalid_exact_evm_insufficient_balance").count();
    let turned_away = results
        .iter()
        .filter(|r| {
            let s = &r["structuredContent"];
            s["axis"] == "failed_attempts"
                && s["charged"] == false
                && s["retry_after_seconds"].as_u64() > Some(0)
        })
        .count();
    println!(
        "unfunded-wallet flood: {unfunded} checked and refused, {turned_away} turned away, {rpc_calls} RPC calls"
    );
    assert!(results.iter().all(|r| r["isError"] == true));
    assert_eq!(unfunded + turned_away, 5_000, "{:?}", results.iter().find(|r| error(r) != "rate_limited"));
    // A client with no failure yet is not slowed down, so the first concurrent wave (16) passes
    // before any of it fails; from then on, each attempt takes its unit before it is checked.
    assert!(unfunded <= 16 + 20, "{unfunded} attempts were checked against a budget of 20");
    assert!(rpc_calls <= 300, "RPC calls stay bounded: {rpc_calls} for 5,000 attempts");
    assert_eq!(app.runs(), 0);
    // Attack: wait for one unit to refill (20 per minute: 3 s), then send 50 at once. Only the
    // attempt that took the refilled unit is checked; the rest are turned away unverified.
    app.advance_time(3).await;
    let wave: Vec<Value> = (0..50).map(|_| app.sign(&PrivateKeySigner::random(), &requirements)).collect();
    let wave = pay_all(&app.sessionless(), wave).await;
    let checked = wave.iter().filter(|r| error(r) == "invalid_exact_evm_insufficient_balance").count();
    assert!(checked <= 1, "{checked} of 50 concurrent attempts were checked after a refill of one");
    // An honest, funded payer on another IP is served as usual.
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let honest = Mcp::sessionless_from(&app.mcp_url(), "127.0.0.2".parse().unwrap());
    let payload = app.sign(&payer, &requirements);
    let result = honest.call_tool("counted", json!({}), Some(json!({ "x402/payment": payload }))).await;
    assert_eq!(result["isError"], false, "{result}");
    assert_eq!(app.runs(), 1);
    assert_eq!(
        before - app.balance(payer.address()).await,
        requirements.amount.parse::<alloy::primitives::U256>().unwrap()
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_public_endpoints_have_their_own_bucket_per_client_and_probes_stay_free() {
    // Arrange: a public budget of 5 with a slow refill; the MCP ceiling as configured.
    let app = spawn_app_with(|c| {
        c.ceiling.public_burst = 5;
        c.ceiling.public_per_second = 1;
    })
    .await;
    let (base, http) = (app.base_url(), reqwest::Client::new());
    // Act: a flood of the listing and of proof requests from one IP.
    let mut statuses = Vec::new();
    for path in ["/.well-known/x402", "/log/checkpoint", "/log/inclusion?index=0&tree_size=1"].repeat(10) {
        statuses.push(http.get(format!("{base}{path}")).send().await.unwrap());
    }
    // Assert: at most the burst (plus a refill) passed; the rest got 429 with Retry-After.
    let refused: Vec<_> = statuses.iter().filter(|r| r.status() == 429).collect();
    assert!(refused.len() >= 24, "{} of 30 refused", refused.len());
    let retry = refused[0].headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap();
    assert!(retry >= 1);
    let body: Value = http.get(format!("{base}/log/checkpoint")).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["axis"], "public", "{body}");
    // Probes, the MCP endpoint and another client are untouched by this client's flood.
    assert_eq!(http.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    let echo = app.sessionless().call_tool("echo", json!({ "text": "still here" }), None).await;
    assert_eq!(echo["isError"], false);
    let other = reqwest::Client::builder().local_address("127.0.0.2".parse().ok()).build().unwrap();
    assert_eq!(other.get(format!("{base}/.well-known/x402")).send().await.unwrap().status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn readyz_floods_cost_no_rpc_and_metrics_can_live_on_a_private_address() {
    // Arrange: every RPC call counted; metrics on an address of their own.
    let mut app = spawn_app_with(|c| c.server.readiness_refresh_ms = 60_000).await;
    let rpc = CountingRpc::start(&app.chain.anvil.endpoint()).await;
    let mut config = app.state.config.clone();
    config.network.rpc_url = rpc.url.clone().into();
    config.server.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    app.replace_server(config).await;
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{}/readyz", app.base_url())).send().await.unwrap().status(), 200);
    let before = rpc.calls();
    // Act: 500 readiness probes.
    for _ in 0..500 {
        assert_eq!(http.get(format!("{}/readyz", app.base_url())).send().await.unwrap().status(), 200);
    }
    // Assert: answered from the background report: not one RPC call.
    assert_eq!(rpc.calls() - before, 0, "readyz asked the chain");
    // /metrics is not served on the public address, and is on its own.
    assert_eq!(http.get(format!("{}/metrics", app.base_url())).send().await.unwrap().status(), 404);
    let metrics = app.metrics_addr.expect("a metrics address");
    let text = http.get(format!("http://{metrics}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("tollgate_"), "{text}");
    app.shutdown().await;
}
