//! Ceiling and wallet limits, seen from outside: HTTP 429s, `rate_limited` tool results,
//! nothing charged, authorizations left usable, one combined limit across replicas.

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use serde_json::{Value, json};
use tollgate::config::{Axis, LimitBackend, LimitRule};

use crate::helpers::{COUNTED_PRICE, Mcp, TestApp, fresh_schema, spawn_app_with};

fn rule(axis: Axis, requests: u64, spend: &str) -> LimitRule {
    let spend = (!spend.is_empty()).then(|| spend.parse().expect("an amount"));
    LimitRule { axis, window_secs: 60, requests, spend, tool: String::new() }
}

async fn fund(app: &TestApp, who: Address) {
    let minter = tollgate::chain::parse_private_key(tollgate::chain::anvil::DEV_KEYS[0]).unwrap();
    let provider = alloy::providers::ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(minter))
        .connect_http(app.chain.anvil.endpoint().parse().unwrap());
    tollgate::chain::usdc::mint(&provider, app.chain.token, who, U256::from(10_000_000u64)).await.unwrap();
}

/// Pays `tool` as `payer` through `mcp` with a fresh authorization.
async fn pay_as(app: &TestApp, mcp: &Mcp, payer: &PrivateKeySigner, tool: &str) -> Value {
    let requirements = app.requirements(tool, json!({ "text": "x" })).await;
    let payload = app.sign(payer, &requirements);
    mcp.call_tool(tool, json!({ "text": "x" }), Some(json!({ "x402/payment": payload }))).await
}

fn assert_limited(result: &Value, axis: &str) {
    let body = &result["structuredContent"];
    assert_eq!(result["isError"], true, "{result}");
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert_eq!(body["axis"], axis, "{body}");
    assert_eq!(body["charged"], false);
    assert!(body.get("accepts").is_none() && body.get("x402Version").is_none(), "never looks like a price");
}

#[tokio::test]
async fn a_wallet_burst_passes_then_is_refused_with_retry_after_and_the_authorization_stays_usable() {
    // Arrange: 2 paid calls per minute per wallet, on an injected clock.
    let app = spawn_app_with(|c| c.limits.rules = vec![rule(Axis::Wallet, 2, "")]).await;
    let payer = app.payer();
    let mcp = app.sessionless();
    assert_eq!(pay_as(&app, &mcp, &payer, "counted").await["isError"], false);
    assert_eq!(pay_as(&app, &mcp, &payer, "counted").await["isError"], false);
    let before = app.balance(payer.address()).await;
    let third = app.sign(&payer, &app.requirements("counted", json!({})).await);
    // Act
    let refused = app.pay("counted", json!({}), &third).await;
    // Assert: refused on the wallet axis, told to wait one emission interval (60 s / 2).
    assert_limited(&refused, "wallet");
    let body = &refused["structuredContent"];
    assert_eq!((body["limit"].as_u64(), body["window_seconds"].as_u64()), (Some(2), Some(60)));
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["retry_after_seconds"], 30);
    assert_eq!(app.balance(payer.address()).await, before, "the refusal cost nothing");
    app.clock.advance(29);
    assert_limited(&app.pay("counted", json!({}), &third).await, "wallet");
    app.clock.advance(1);
    // The same authorization was never claimed: it pays now.
    let paid = app.pay("counted", json!({}), &third).await;
    assert_eq!(paid["isError"], false, "{paid}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    assert_eq!(app.runs(), 3);
    app.shutdown().await;
}

#[tokio::test]
async fn each_axis_refuses_independently() {
    for axis in [Axis::Wallet, Axis::Tool, Axis::WalletTool, Axis::Agent] {
        // Arrange: only this axis, one call per minute.
        let app = spawn_app_with(|c| c.limits.rules = vec![rule(axis, 1, "")]).await;
        let (a, b) = (app.payer(), PrivateKeySigner::random());
        fund(&app, b.address()).await;
        let ip = app.sessionless();
        let session = Mcp::with_session(&app.mcp_url()).await;
        // (payer, tool, client) of the first call, then one sharing only this axis' subject,
        // then one sharing everything but it.
        let (same, other): ((&PrivateKeySigner, &str, &Mcp), (&PrivateKeySigner, &str, &Mcp)) = match axis {
            Axis::Wallet => ((&a, "sha256", &session), (&b, "counted", &ip)),
            Axis::Tool => ((&b, "counted", &session), (&a, "sha256", &ip)),
            Axis::WalletTool => ((&a, "counted", &session), (&a, "sha256", &ip)),
            Axis::Agent => ((&b, "sha256", &ip), (&a, "counted", &session)),
        };
        // Act
        let first = pay_as(&app, &ip, &a, "counted").await;
        let denied = pay_as(&app, same.2, same.0, same.1).await;
        let passed = pay_as(&app, other.2, other.0, other.1).await;
        // Assert
        assert_eq!(first["isError"], false, "{axis}: {first}");
        assert_limited(&denied, axis.as_str());
        assert_eq!(passed["isError"], false, "{axis}: a different subject is not limited: {passed}");
        app.shutdown().await;
    }
}

#[tokio::test]
async fn spend_limits_count_usdc_not_requests() {
    let app = spawn_app_with(|c| c.limits.rules = vec![rule(Axis::Wallet, 0, "2000")]).await;
    let payer = app.payer();
    let mcp = app.sessionless();
    assert_eq!(pay_as(&app, &mcp, &payer, "counted").await["isError"], false, "1234 of 2000");
    let refused = pay_as(&app, &mcp, &payer, "counted").await;
    assert_limited(&refused, "wallet");
    assert_eq!(refused["structuredContent"]["unit"], "usdc_atomic");
    assert_eq!(refused["structuredContent"]["limit"], 2000);
    app.shutdown().await;
}

#[tokio::test]
async fn two_instances_sharing_redis_enforce_one_combined_limit() {
    // Arrange: two replicas, one Redis, a fresh key prefix; 3 calls per minute per wallet.
    let prefix = fresh_schema();
    let app = spawn_app_with(|c| {
        c.limits.backend = LimitBackend::Redis;
        c.limits.key_prefix = prefix.clone();
        c.limits.rules = vec![rule(Axis::Wallet, 3, "")];
    })
    .await;
    let sibling = app.sibling().await;
    let payer = app.payer();
    let replicas = [app.sessionless(), Mcp::sessionless(&sibling.mcp_url())];
    // Act: alternate between replicas.
    let mut outcomes = Vec::new();
    for i in 0..4 {
        outcomes.push(pay_as(&app, &replicas[i % 2], &payer, "counted").await);
    }
    // Assert: 3 pass in total, not 3 per replica.
    for ok in &outcomes[..3] {
        assert_eq!(ok["isError"], false, "{ok}");
    }
    assert_limited(&outcomes[3], "wallet");
    assert_eq!(app.runs(), 3);
    sibling.shutdown().await;
    app.shutdown().await;
}

/// A private redis-server on its own port, so the test can stop and restart it.
pub(crate) struct OwnRedis {
    pub(crate) port: u16,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    pub(crate) async fn start(port: u16) -> OwnRedis {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        OwnRedis { port, child: Some(child) }
    }

    pub(crate) async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

#[tokio::test]
async fn paid_calls_fail_closed_while_redis_is_down_and_resume_when_it_returns() {
    // Arrange
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = OwnRedis::start(port).await;
    let app = spawn_app_with(|c| {
        c.limits.backend = LimitBackend::Redis;
        c.limits.redis_url = format!("redis://127.0.0.1:{port}").into();
    })
    .await;
    let payer = app.payer();
    let mcp = app.sessionless();
    assert_eq!(pay_as(&app, &mcp, &payer, "counted").await["isError"], false);
    let before = app.balance(payer.address()).await;
    // Act 1: Redis goes away.
    redis.stop().await;
    let refused = pay_as(&app, &mcp, &payer, "counted").await;
    let ready = crate::helpers::readyz_until(&app.base_url(), 503).await.0;
    // Assert 1: refused, clearly, nothing charged; free tools still work; not ready.
    assert_eq!(refused["structuredContent"]["error"], "limiter_unavailable", "{refused}");
    assert_eq!(refused["structuredContent"]["charged"], false);
    assert_eq!(app.balance(payer.address()).await, before);
    assert_eq!(mcp.call_tool("echo", json!({ "text": "up" }), None).await["isError"], false);
    assert_eq!(ready, 503);
    // Act 2: Redis returns on the same port.
    let _redis = OwnRedis::start(redis.port).await;
    let mut resumed = Value::Null;
    for _ in 0..50 {
        resumed = pay_as(&app, &mcp, &payer, "counted").await;
        if resumed["isError"] == false {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(resumed["isError"], false, "serving resumes on reconnect: {resumed}");
    app.shutdown().await;
}

#[tokio::test]
async fn the_ceiling_answers_429_with_retry_after_and_ratelimit_headers() {
    let app = spawn_app_with(|c| {
        c.ceiling.burst = 3;
        c.ceiling.per_second = 1;
    })
    .await;
    let mcp = app.sessionless();
    let list = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {} });
    for i in 0..3 {
        let ok = mcp.post(&list).await;
        assert_eq!(ok.status(), 200, "request {i}");
        assert_eq!(ok.headers()["ratelimit-policy"], "\"ceiling\";q=3;w=3");
        assert!(ok.headers()["ratelimit"].to_str().unwrap().starts_with("\"ceiling\";r="));
    }
    let refused = mcp.post(&list).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["ratelimit"], "\"ceiling\";r=0;t=1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["data"]["axis"], "ceiling", "{body}");
    assert_eq!(body["error"]["data"]["key_kind"], "ip");
    assert_eq!(body["error"]["data"]["retry_after_seconds"], 1);
    // Probes are exempt (the ceiling stands in front of /mcp only); metrics count the refusal.
    let health = reqwest::get(format!("{}/healthz", app.base_url())).await.unwrap();
    assert_eq!(health.status(), 200, "a flooded /mcp must not take the probes down");
    assert_eq!(mcp.post(&list).await.status(), 429, "still refused");
    let metrics = reqwest::get(format!("{}/metrics", app.base_url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_ceiling_refusals_total{key_kind=\"ip\"}"), "{metrics}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_forged_forwarded_for_from_an_untrusted_peer_is_keyed_on_the_peer() {
    let app = spawn_app_with(|c| {
        c.ceiling.burst = 2;
        c.ceiling.per_second = 1;
    })
    .await;
    let http = reqwest::Client::new();
    let list = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {} });
    let mut statuses = Vec::new();
    for forged in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let response = http
            .post(app.mcp_url())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("x-forwarded-for", forged)
            .json(&list)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429], "three 'different' clients are one peer");
    app.shutdown().await;
}

#[tokio::test]
async fn a_shared_ceiling_is_one_bucket_across_replicas() {
    let prefix = fresh_schema();
    let app = spawn_app_with(|c| {
        c.ceiling.shared = true;
        c.ceiling.burst = 3;
        c.ceiling.per_second = 1;
        c.limits.key_prefix = prefix.clone();
    })
    .await;
    let sibling = app.sibling().await;
    let list = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {} });
    let (a, b) = (app.sessionless(), Mcp::sessionless(&sibling.mcp_url()));
    let mut statuses = Vec::new();
    for mcp in [&a, &b, &a, &b] {
        statuses.push(mcp.post(&list).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    sibling.shutdown().await;
    app.shutdown().await;
}
