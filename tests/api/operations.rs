//! Operating tollgate: readiness, metrics, the marketplace listing.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, pg_behind_relay, spawn_app, spawn_app_with};

async fn readyz(app: &TestApp) -> (u16, Value) {
    let response = reqwest::get(format!("{}/readyz", app.base_url())).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn readiness_checks_store_chain_and_relayer_gas() {
    let app = spawn_app().await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    for check in ["store", "chain", "limiter", "relayer_gas"] {
        assert_eq!(body["checks"][check], "ok", "{body}");
    }
    app.shutdown().await;
    // A relayer that cannot pay for gas makes the server unready: no challenge it cannot settle.
    let poor =
        spawn_app_with(|c| c.payment.min_relayer_balance_wei = 1_000_000_000_000_000_000_000_000).await;
    let (status, body) = readyz(&poor).await;
    assert_eq!(status, 503);
    assert!(body["checks"]["relayer_gas"].as_str().unwrap().contains("below"), "{body}");
    poor.shutdown().await;
}

#[tokio::test]
async fn metrics_count_challenges_payments_revenue_and_settlement_latency() {
    let app = spawn_app().await;
    let payload = app.sign(&app.payer(), &app.requirements("counted", json!({})).await);
    app.pay("counted", json!({}), &payload).await;
    let text = reqwest::get(format!("{}/metrics", app.base_url())).await.unwrap().text().await.unwrap();
    for series in [
        "tollgate_challenges_total{tool=\"counted\"}",
        "tollgate_payments_total{outcome=\"settled\"}",
        "tollgate_revenue_atomic_total{tool=\"counted\"}",
        "tollgate_calls_total{tool=\"counted\",kind=\"paid\"}",
        "tollgate_settlement_seconds",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn the_listing_describes_the_server_for_the_mcp_registry_and_x402_discovery() {
    let app = spawn_app().await;
    let catalog = app.state.catalog.current();
    let docs = tollgate::listing::documents(
        &tollgate::listing::ListingInput::of(&app.state, &catalog),
        1_700_000_000,
    );
    let server = &docs["server.json"];
    assert_eq!(server["$schema"], tollgate::listing::SERVER_SCHEMA);
    assert_eq!(server["remotes"][0]["type"], "streamable-http");
    let x402 = &server["_meta"]["io.modelcontextprotocol.registry/publisher-provided"]["x402"];
    assert_eq!(x402["network"], app.state.network.caip2);
    let discovery = &docs["x402_discovery"];
    assert_eq!(discovery["type"], "mcp");
    let accepts = discovery["accepts"].as_array().unwrap();
    assert_eq!(accepts.len(), 4, "one entry per priced tool: sha256, quote_of_the_day, counted, slow");
    assert_eq!(discovery["metadata"]["tools"][0]["info"]["input"]["type"], "mcp");
    app.shutdown().await;
}

#[tokio::test]
async fn readyz_turns_unready_when_postgres_stops_and_ready_when_it_returns() {
    let (relay, url) = pg_behind_relay().await;
    let app = spawn_app_with(|c| c.database.url = url.into()).await;
    assert_eq!(readyz(&app).await.0, 200);
    relay.up.store(false, Ordering::SeqCst);
    // Relayed connections close within a few milliseconds of the cut; poll, do not sleep.
    let (mut status, mut body) = readyz(&app).await;
    for _ in 0..50 {
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        (status, body) = readyz(&app).await;
    }
    assert_eq!(status, 503, "{body}");
    assert_ne!(body["checks"]["store"], "ok");
    // A paid call meanwhile is refused cleanly, charging nothing.
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let refused = app.pay("counted", json!({}), &payload).await;
    assert_eq!(refused["structuredContent"]["error"], "store_unavailable", "{refused}");
    assert_eq!(app.balance(payer.address()).await, before);
    relay.up.store(true, Ordering::SeqCst);
    let mut status = 0;
    for _ in 0..50 {
        status = readyz(&app).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "ready again once Postgres returns");
    let paid = app.pay("counted", json!({}), &payload).await;
    assert_eq!(paid["isError"], false, "the same authorization pays after recovery: {paid}");
    app.shutdown().await;
}
