//! The ceiling holds against clients that mint keys: a session id earns its own bucket only if
//! this server issued it, so a fresh random id per request buys nothing.

use std::time::Instant;

use serde_json::json;

use crate::helpers::{Mcp, Server, TestApp, fresh_schema, spawn_app_with};

const BURST: u32 = 20;
const PER_SECOND: u32 = 5;

/// Sends `n` `tools/call echo` requests, each with a freshly minted session id, round-robin
/// over `urls`, in the given protocol era; returns how many were let past the ceiling.
async fn minted_flood(urls: &[String], n: usize, era: &str) -> usize {
    let http = reqwest::Client::new();
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": { "name": "echo", "arguments": { "text": "x" } } });
    let mut admitted = 0;
    for i in 0..n {
        let mut request = http
            .post(&urls[i % urls.len()])
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", hex::encode(rand::random::<[u8; 16]>()))
            .header("mcp-protocol-version", era)
            .json(&body);
        if era == "2026-07-28" {
            request = request.header("mcp-method", "tools/call").header("mcp-name", "echo");
        }
        admitted += usize::from(request.send().await.unwrap().status() != 429);
    }
    admitted
}

/// At most the burst plus what refilled while the flood ran (and one for rounding).
fn allowed(started: Instant) -> usize {
    (BURST + PER_SECOND * started.elapsed().as_secs_f64().ceil() as u32 + 1) as usize
}

async fn tight_app(shared: bool) -> TestApp {
    let prefix = fresh_schema();
    spawn_app_with(move |c| {
        c.ceiling.burst = BURST;
        c.ceiling.per_second = PER_SECOND;
        c.ceiling.shared = shared;
        c.limits.key_prefix = prefix;
    })
    .await
}

#[tokio::test]
async fn minted_session_ids_count_against_the_client_on_both_protocol_eras() {
    for era in ["2025-06-18", "2026-07-28"] {
        // Arrange: an honest session opened before the flood.
        let app = tight_app(false).await;
        let honest = Mcp::with_session(&app.mcp_url()).await;
        // Act
        let started = Instant::now();
        let admitted = minted_flood(&[app.mcp_url()], 600, era).await;
        // Assert: one client, one bucket, whatever ids it makes up; none enters the key table.
        assert!(admitted <= allowed(started), "{era}: {admitted} of 600 admitted");
        assert!(
            app.state.ceiling.tracked_keys() <= 2,
            "{era}: {} keys tracked",
            app.state.ceiling.tracked_keys()
        );
        // The honest session, issued by the server, still has its own bucket.
        assert!(!honest.list_tools().await.is_empty(), "{era}: the honest session is served");
        app.shutdown().await;
    }
}

#[tokio::test]
async fn minted_session_ids_buy_nothing_across_replicas_sharing_the_ceiling() {
    // Arrange: two replicas, one Redis ceiling.
    let app = tight_app(true).await;
    let sibling: Server = app.sibling().await;
    // Act
    let started = Instant::now();
    let admitted = minted_flood(&[app.mcp_url(), sibling.mcp_url()], 600, "2025-06-18").await;
    // Assert
    assert!(admitted <= allowed(started), "{admitted} of 600 admitted across two replicas");
    sibling.shutdown().await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_client_cannot_multiply_its_ceiling_by_opening_sessions() {
    // Arrange: each client may hold three live sessions (each one a bucket of its own).
    let app = spawn_app_with(|c| c.ceiling.max_sessions_per_client = 3).await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(Mcp::with_session(&app.mcp_url()).await);
    }
    let init = json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": { "name": "greedy", "version": "0" } } });
    // Act: a fourth.
    let fourth = Mcp::sessionless(&app.mcp_url()).post(&init).await;
    // Assert: refused, clearly, with no session issued.
    assert_eq!(fourth.status(), 429);
    assert!(fourth.headers().get("mcp-session-id").is_none());
    let body: serde_json::Value = fourth.json().await.unwrap();
    assert_eq!(body["error"]["data"]["error"], "session_limit", "{body}");
    // Closing one gives the slot back.
    let closed = reqwest::Client::new()
        .delete(app.mcp_url())
        .header("mcp-session-id", sessions[0].session.as_deref().unwrap())
        .header("mcp-protocol-version", "2025-06-18")
        .send()
        .await
        .unwrap();
    assert!(closed.status().is_success(), "DELETE: {}", closed.status());
    let again = Mcp::with_session(&app.mcp_url()).await;
    assert!(!again.list_tools().await.is_empty());
    app.shutdown().await;
}
