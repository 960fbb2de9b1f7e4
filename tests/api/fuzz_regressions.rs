//! Replays the MCP request fuzzer's seeds and every input it ever crashed on
//! (`fuzz/seeds/mcp_request`, `fuzz/regressions/mcp_request`) through a real server over HTTP,
//! with the same input format and invariants as the fuzz target (`fuzz/harness/mcp.rs`).

use std::time::Duration;

use serde_json::json;

use crate::helpers::{repo_root, spawn_app_with};

#[path = "../../fuzz/harness/mcp.rs"]
mod harness;

fn inputs() -> Vec<(String, Vec<u8>)> {
    let mut inputs = Vec::new();
    for dir in ["fuzz/seeds/mcp_request", "fuzz/regressions/mcp_request"] {
        let Ok(entries) = std::fs::read_dir(repo_root().join(dir)) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            inputs.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    inputs.sort();
    inputs
}

#[tokio::test]
async fn every_fuzz_seed_and_past_crash_is_answered_cleanly_and_charges_nothing() {
    let app = spawn_app_with(|c| {
        // As in the fuzz target: the server cannot reach the chain, so nothing can settle.
        c.network.rpc_url = "http://127.0.0.1:9".to_owned().into();
        c.ceiling.burst = 100_000;
    })
    .await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let requirements = app.requirements("sha256", json!({ "text": "hi" })).await;
    let payment = serde_json::to_vec(&app.sign(&payer, &requirements)).unwrap();
    let inputs = inputs();
    assert!(inputs.len() >= 10, "the seed corpus is missing: {}", inputs.len());
    let http = reqwest::Client::new();
    for (name, data) in &inputs {
        let request = harness::build(data, &payment);
        let mut send = http.request(request.method().clone(), app.mcp_url());
        for (header, value) in request.headers() {
            send = send.header(header, value);
        }
        let response = send.body(request.body().clone()).send().await.unwrap();
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        // An event stream may stay open: what arrives at once is enough.
        let Ok(Ok(body)) = tokio::time::timeout(Duration::from_millis(500), response.bytes()).await else {
            continue;
        };
        if let Err(violation) = harness::check(status, &content_type, &body) {
            panic!("{name}: {violation}");
        }
    }
    assert_eq!(app.balance(payer.address()).await, before, "nobody was charged");
    assert_eq!(app.state.store.receipt_count().await.unwrap(), 0, "no receipt was issued");
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}
